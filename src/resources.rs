//! Resource vectors and the one fit function.
//!
//! Placement (deciding on a possibly stale cache) and the commit protocol (deciding on the fresh state etcd
//! returned) must agree on what "fits" means, or a scheduler can keep proposing claims the committer keeps
//! rejecting forever. Both call [`Resources::fit`]; there is no other definition of fit in the project.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A quantity of every dimension the scheduler accounts for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in millicores (1000 = one core).
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
}

/// A resource dimension, named in conflict reasons and pending reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    Cpu,
    Memory,
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dimension::Cpu => "cpu",
            Dimension::Memory => "memory",
        })
    }
}

impl Resources {
    pub const ZERO: Resources = Resources { cpu_millis: 0, memory_bytes: 0 };

    pub const fn new(cpu_millis: u64, memory_bytes: u64) -> Self {
        Resources { cpu_millis, memory_bytes }
    }

    /// Whether `request` fits on a node of `capacity` that already has `used` claimed. Returns the first
    /// dimension that would be exceeded, so a refusal can say why.
    pub fn fit(capacity: Resources, used: Resources, request: Resources) -> Result<(), Dimension> {
        // An overflowing sum cannot fit any capacity.
        if used.cpu_millis.checked_add(request.cpu_millis).is_none_or(|sum| sum > capacity.cpu_millis) {
            return Err(Dimension::Cpu);
        }
        if used.memory_bytes.checked_add(request.memory_bytes).is_none_or(|sum| sum > capacity.memory_bytes) {
            return Err(Dimension::Memory);
        }
        Ok(())
    }

    /// The first dimension in which `self` exceeds `capacity`, if any.
    pub fn exceeds(self, capacity: Resources) -> Option<Dimension> {
        Resources::fit(capacity, Resources::ZERO, self).err()
    }

    pub fn saturating_add(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
        }
    }

    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
        }
    }

    /// Free room on a node: capacity minus used, never negative.
    pub fn free(capacity: Resources, used: Resources) -> Resources {
        capacity.saturating_sub(used)
    }
}

impl std::iter::Sum for Resources {
    fn sum<I: Iterator<Item = Resources>>(iter: I) -> Resources {
        iter.fold(Resources::ZERO, Resources::saturating_add)
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cpu={}m mem={}Mi", self.cpu_millis, self.memory_bytes / (1 << 20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_names_the_first_exceeded_dimension() {
        let cap = Resources::new(4000, 16 << 30);
        assert_eq!(Resources::fit(cap, Resources::new(3500, 0), Resources::new(500, 1)), Ok(()));
        assert_eq!(Resources::fit(cap, Resources::new(3500, 0), Resources::new(501, 1)), Err(Dimension::Cpu));
        assert_eq!(Resources::fit(cap, Resources::new(0, 16 << 30), Resources::new(0, 1)), Err(Dimension::Memory));
    }

    #[test]
    fn fit_does_not_overflow() {
        let cap = Resources::new(u64::MAX, u64::MAX);
        assert_eq!(Resources::fit(cap, Resources::new(u64::MAX, 0), Resources::new(1, 0)), Err(Dimension::Cpu));
    }

    #[test]
    fn sum_and_free() {
        let total: Resources = [Resources::new(1, 2), Resources::new(3, 4)].into_iter().sum();
        assert_eq!(total, Resources::new(4, 6));
        assert_eq!(Resources::free(Resources::new(2, 2), Resources::new(5, 1)), Resources::new(0, 1));
    }
}
