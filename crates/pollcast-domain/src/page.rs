//! Keyset paging of the list endpoints. A page continues after an item the client
//! already has, so paging stays exact while participants join or polls are created
//! between two requests (an offset would skip or repeat items).

use sea_orm::sea_query::SimpleExpr;
use sea_orm::{ColumnTrait, Condition};
use uuid::Uuid;

/// The largest page a client may ask for.
pub const MAX_PAGE: u32 = 1000;

/// Which part of a list a client asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// At most this many items; `None` with no `after` is the whole list (the
    /// contract's unpaged answer), `None` with `after` is [`MAX_PAGE`].
    pub limit: Option<u32>,
    /// Continue after the item with this id.
    pub after: Option<Uuid>,
}

impl PageRequest {
    /// The whole list, as the contract's unpaged endpoints answer.
    pub const ALL: PageRequest = PageRequest {
        limit: None,
        after: None,
    };

    /// How many rows to read: one more than the page, to learn whether another
    /// page follows without a second query. `None` reads everything.
    pub(crate) fn rows_to_read(&self) -> Option<u64> {
        self.page_size().map(|n| u64::from(n) + 1)
    }

    fn page_size(&self) -> Option<u32> {
        match (self.limit, self.after) {
            (Some(limit), _) => Some(limit),
            (None, Some(_)) => Some(MAX_PAGE),
            (None, None) => None,
        }
    }

    /// Cuts what was read to the page and says whether more follows.
    pub(crate) fn cut<T>(&self, mut items: Vec<T>) -> Page<T> {
        let more = match self.page_size() {
            Some(size) if items.len() > size as usize => {
                items.truncate(size as usize);
                true
            }
            _ => false,
        };
        Page { items, more }
    }
}

/// Rows that come after the row `(at, id)` in a list ordered by `(order, key)`:
/// later, or as late with a larger id.
pub(crate) fn after<C: ColumnTrait>(
    order: C,
    key: C,
    at: impl Into<sea_orm::Value> + Clone,
    id: Uuid,
) -> Condition {
    let later: SimpleExpr = order.gt(at.clone());
    Condition::any()
        .add(later)
        .add(Condition::all().add(order.eq(at)).add(key.gt(id)))
}

/// One page of a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    /// The items, in the list's order.
    pub items: Vec<T>,
    /// Whether items follow the last one of this page.
    pub more: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_list_is_never_cut() {
        let page = PageRequest::ALL.cut((0..5000).collect());
        assert_eq!(page.items.len(), 5000);
        assert!(!page.more);
        assert_eq!(PageRequest::ALL.rows_to_read(), None);
    }

    #[test]
    fn a_limit_reads_one_extra_row_to_see_the_next_page() {
        let request = PageRequest {
            limit: Some(3),
            after: None,
        };
        assert_eq!(request.rows_to_read(), Some(4));
        let full = request.cut(vec![1, 2, 3, 4]);
        assert_eq!(full.items, vec![1, 2, 3]);
        assert!(full.more);
        let last = request.cut(vec![1, 2, 3]);
        assert!(!last.more);
    }

    #[test]
    fn after_without_limit_pages_by_the_maximum() {
        let request = PageRequest {
            limit: None,
            after: Some(Uuid::nil()),
        };
        assert_eq!(request.rows_to_read(), Some(u64::from(MAX_PAGE) + 1));
    }
}
