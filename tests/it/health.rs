//! `/healthz` and `/readyz`.

use pollcast_tests::server::Options;
use pollcast_tests::stream::SwitchableStream;
use pollcast_tests::{Backend, TestServer};

async fn healthz_and_readyz_answer_200_when_all_is_well(backend: Backend) {
    let t = TestServer::start(backend).await;
    assert_eq!(t.api.get("/healthz", None).await.status, 200);
    assert_eq!(t.api.get("/readyz", None).await.status, 200);
}

async fn readyz_is_503_while_the_event_stream_is_unreachable(backend: Backend) {
    let stream = SwitchableStream::down();
    let t = TestServer::start_with(
        backend,
        Options {
            stream: stream.clone(),
            ..Options::default()
        },
    )
    .await;
    t.api
        .get("/readyz", None)
        .await
        .expect_error(503, "unavailable");
    assert_eq!(
        t.api.get("/healthz", None).await.status,
        200,
        "alive all the same"
    );
    stream.set_up(true);
    assert_eq!(t.api.get("/readyz", None).await.status, 200);
}

pollcast_tests::on_both_backends!(
    healthz_and_readyz_answer_200_when_all_is_well,
    readyz_is_503_while_the_event_stream_is_unreachable,
);
