//! When the sampler reads: on wall-clock boundaries (whole seconds in production), as pure
//! arithmetic on "time since the Unix epoch" so tests drive it with made-up clocks.
//!
//! A boundary is served if the sampler wakes within half a period of it, and labelled with the
//! boundary's time. Later than that (a tick that ran long, a stalled machine, the wall clock
//! stepped forward) the boundary is counted as missed and the sampler waits for the next one:
//! the counters are cumulative, so a missed tick loses time resolution but no usage, and a
//! sampler that cannot keep up never degenerates into back-to-back ticks. If the wall clock
//! steps back, the schedule restarts from the new time.

use std::time::Duration;

/// What the sampler does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Read every target for the boundary `at`, `lag` after it.
    Tick {
        /// The boundary, since the epoch.
        at: Duration,
        /// How late the wake-up is.
        lag: Duration,
        /// Boundaries skipped before this one.
        missed: u64,
    },
    /// Nothing due: wait this long (for a command or the boundary).
    Wait {
        /// Time until the next boundary.
        sleep: Duration,
        /// Boundaries just given up on.
        missed: u64,
    },
}

/// The boundary grid and the next boundary not yet served.
#[derive(Debug, Clone)]
pub(crate) struct Schedule {
    period: Duration,
    next: Duration,
}

impl Schedule {
    /// A schedule whose first tick is the first boundary after `now`. `period` must be non-zero.
    pub(crate) fn new(period: Duration, now: Duration) -> Self {
        Self {
            period,
            next: boundary_after(now, period),
        }
    }

    /// Decides what to do at `now`.
    pub(crate) fn poll(&mut self, now: Duration) -> Step {
        if now < self.next {
            if self.next - now > self.period {
                // The clock stepped back: start again from the new time.
                self.next = boundary_after(now, self.period);
            }
            return Step::Wait {
                sleep: self.next - now,
                missed: 0,
            };
        }
        let late = now - self.next;
        let skipped = whole_periods(late, self.period);
        let at = self.next + periods(skipped, self.period);
        let lag = now.saturating_sub(at);
        self.next = at + self.period;
        if lag <= self.period / 2 {
            Step::Tick {
                at,
                lag,
                missed: saturate_u64(skipped),
            }
        } else {
            Step::Wait {
                sleep: self.next - now,
                missed: saturate_u64(skipped).saturating_add(1),
            }
        }
    }
}

/// The first multiple of `period` strictly after `now`.
fn boundary_after(now: Duration, period: Duration) -> Duration {
    periods(whole_periods(now, period) + 1, period)
}

fn saturate_u64(n: u128) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// How many whole periods fit in `d`.
fn whole_periods(d: Duration, period: Duration) -> u128 {
    d.as_nanos() / period.as_nanos().max(1)
}

/// `n` periods, computed in nanoseconds: `Duration * u32` overflows for 100 ms periods since the
/// epoch. Saturates far beyond any real clock.
fn periods(n: u128, period: Duration) -> Duration {
    let nanos = n.saturating_mul(period.as_nanos());
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
    let sub = u32::try_from(nanos % 1_000_000_000).unwrap_or(0);
    Duration::new(secs, sub)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn waits_for_the_next_whole_second_and_ticks_on_it() {
        let mut s = Schedule::new(S, ms(100_250));
        assert_eq!(
            s.poll(ms(100_250)),
            Step::Wait {
                sleep: ms(750),
                missed: 0
            }
        );
        assert_eq!(
            s.poll(ms(101_002)),
            Step::Tick {
                at: ms(101_000),
                lag: ms(2),
                missed: 0
            }
        );
        // Served: the next poll in the same second waits for the next boundary.
        assert_eq!(
            s.poll(ms(101_300)),
            Step::Wait {
                sleep: ms(700),
                missed: 0
            }
        );
        // A boundary exactly on time.
        assert!(matches!(s.poll(ms(102_000)), Step::Tick { at, .. } if at == ms(102_000)));
    }

    #[test]
    fn a_long_tick_skips_to_a_later_boundary_and_counts_the_misses() {
        let mut s = Schedule::new(S, ms(100_900));
        assert!(matches!(s.poll(ms(101_000)), Step::Tick { .. }));
        // The tick took 2.2 s: 102 and 103 passed; 103 is 200 ms ago, close enough to serve.
        assert_eq!(
            s.poll(ms(103_200)),
            Step::Tick {
                at: ms(103_000),
                lag: ms(200),
                missed: 1
            }
        );
        // 3.7 s later: 104..106 passed, 106 is 700 ms ago, too late; wait for 107.
        assert_eq!(
            s.poll(ms(106_700)),
            Step::Wait {
                sleep: ms(300),
                missed: 3
            }
        );
        assert!(matches!(s.poll(ms(107_001)), Step::Tick { missed: 0, .. }));
    }

    #[test]
    fn a_clock_stepped_back_restarts_the_grid() {
        let mut s = Schedule::new(S, ms(100_500));
        assert_eq!(
            s.poll(ms(50_400)),
            Step::Wait {
                sleep: ms(600),
                missed: 0
            }
        );
        assert!(matches!(s.poll(ms(51_000)), Step::Tick { at, .. } if at == ms(51_000)));
    }

    #[test]
    fn todays_clock_with_short_periods() {
        // 1.7e9 s since the epoch is 1.7e10 periods of 100 ms: more than a u32 multiplier holds.
        let p = ms(100);
        let now = Duration::new(1_700_000_000, 123_000_000);
        let mut s = Schedule::new(p, now);
        assert_eq!(
            s.poll(now),
            Step::Wait {
                sleep: ms(77),
                missed: 0
            }
        );
        let at = Duration::new(1_700_000_000, 200_000_000);
        assert!(matches!(s.poll(at + ms(1)), Step::Tick { at: a, .. } if a == at));
    }

    #[test]
    fn short_periods_align_to_their_own_grid() {
        let p = ms(100);
        let mut s = Schedule::new(p, ms(1_234));
        assert_eq!(
            s.poll(ms(1_234)),
            Step::Wait {
                sleep: ms(66),
                missed: 0
            }
        );
        assert!(matches!(s.poll(ms(1_300)), Step::Tick { at, .. } if at == ms(1_300)));
    }
}
