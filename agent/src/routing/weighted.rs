//! Weighted choice among a route's backends (Gateway API `backendRefs`
//! weights): each backend gets traffic in proportion to its weight, and a
//! backend of weight 0 gets none.

use super::RoutingError;

/// Items with integer weights, picked by a uniform draw over the sum.
#[derive(Debug, Clone)]
pub struct Weighted<T> {
    items: Vec<(T, u32)>,
    /// `ends[i]` is the exclusive end of item `i`'s range of draws; a zero
    /// weight gives an empty range, so that item is never picked.
    ends: Vec<u32>,
}

impl<T> Weighted<T> {
    pub fn new(items: Vec<(T, u32)>) -> Result<Self, RoutingError> {
        if items.is_empty() {
            return Err(RoutingError::NoBackends);
        }
        let mut ends = Vec::with_capacity(items.len());
        let mut total: u32 = 0;
        for (_, weight) in &items {
            total = total
                .checked_add(*weight)
                .ok_or(RoutingError::WeightOverflow)?;
            ends.push(total);
        }
        if total == 0 {
            return Err(RoutingError::AllWeightsZero);
        }
        Ok(Self { items, ends })
    }

    /// The item whose range holds `r`, for `r` drawn uniformly in
    /// `0..total()`. An `r` beyond that is reduced modulo the total rather
    /// than panicking, which keeps every input answerable.
    pub fn pick(&self, r: u32) -> &T {
        let r = r % self.total();
        let index = self.ends.partition_point(|&end| end <= r);
        &self.items[index].0
    }

    /// The items with their weights, in declaration order.
    pub fn iter(&self) -> impl Iterator<Item = (&T, u32)> {
        self.items.iter().map(|(t, w)| (t, *w))
    }

    pub fn pick_random(&self) -> &T {
        self.pick(rand::random_range(..self.total()))
    }

    pub fn total(&self) -> u32 {
        // `new` refuses an empty list, so there is always a last end.
        self.ends[self.ends.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn rejects_empty_all_zero_and_overflowing_lists() {
        assert!(matches!(
            Weighted::<()>::new(vec![]),
            Err(RoutingError::NoBackends)
        ));
        assert!(matches!(
            Weighted::new(vec![("a", 0), ("b", 0)]),
            Err(RoutingError::AllWeightsZero)
        ));
        assert!(matches!(
            Weighted::new(vec![("a", u32::MAX), ("b", 1)]),
            Err(RoutingError::WeightOverflow)
        ));
    }

    #[test]
    fn ranges_follow_declaration_order() {
        let w = Weighted::new(vec![("a", 1), ("zero", 0), ("b", 3)]).unwrap();
        assert_eq!(w.total(), 4);
        let picks: Vec<_> = (0..4).map(|r| *w.pick(r)).collect();
        assert_eq!(picks, ["a", "b", "b", "b"]);
        // Out-of-range draws wrap instead of panicking.
        assert_eq!(*w.pick(4), "a");
        assert_eq!(*w.pick(u32::MAX), *w.pick(u32::MAX % 4));
    }

    #[test]
    fn single_backend_always_wins() {
        let w = Weighted::new(vec![("only", 7)]).unwrap();
        for _ in 0..100 {
            assert_eq!(*w.pick_random(), "only");
        }
    }

    #[test]
    fn random_picks_converge_to_the_weights() {
        let mut rng = StdRng::seed_from_u64(7);
        let w = Weighted::new(vec![(0usize, 10), (1, 30), (2, 0), (3, 60)]).unwrap();
        let mut counts = [0u32; 4];
        let n = 100_000;
        for _ in 0..n {
            counts[*w.pick(rng.random_range(..w.total()))] += 1;
        }
        assert_eq!(counts[2], 0);
        for (i, share) in [(0, 0.10), (1, 0.30), (3, 0.60)] {
            let got = f64::from(counts[i]) / f64::from(n);
            assert!((got - share).abs() < 0.01, "item {i}: {got} vs {share}");
        }
    }

    proptest! {
        /// Every draw in `0..total` lands somewhere, and each item owns
        /// exactly as many draws as its weight: uniform draws therefore pick
        /// items exactly in proportion to their weights.
        #[test]
        fn each_item_owns_exactly_its_weight_of_draws(
            weights in proptest::collection::vec(0u32..50, 1..12)
        ) {
            prop_assume!(weights.iter().any(|&w| w > 0));
            let w = Weighted::new(weights.iter().copied().enumerate().collect()).unwrap();
            let mut counts = vec![0u32; weights.len()];
            for r in 0..w.total() {
                counts[*w.pick(r)] += 1;
            }
            prop_assert_eq!(counts, weights);
        }
    }
}
