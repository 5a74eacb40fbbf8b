//! Stream messages and presence signals as they arrive from NATS, in both formats.
#![no_main]

use pollcast_protocol::{DomainEvent, Envelope, PresenceSignal, SessionEvent, WireFormat};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for format in [WireFormat::Json, WireFormat::MessagePack] {
        let _ = format.decode::<Envelope<DomainEvent>>(data);
        let _ = format.decode::<SessionEvent>(data);
        let _ = format.decode::<PresenceSignal>(data);
    }
});
