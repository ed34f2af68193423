//! The receiver's decisions as pure functions: offer validation, resume offset, quota, free space.

use std::sync::{Arc, Mutex, PoisonError};

use crate::error::Refusal;
use crate::name::sanitise;
use crate::wire::{MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, Offer};

/// Default per-session quota: 4 GiB.
pub const DEFAULT_QUOTA: u64 = 4 << 30;
/// Default room left free on the target file system: 64 MiB (or 1 % of a smaller file system).
pub const DEFAULT_FREE_SPACE_MARGIN: u64 = 64 << 20;

/// An offer that passed every check that needs no file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ValidOffer {
    pub components: Vec<String>,
    pub size: u64,
    pub hash: [u8; 32],
    pub chunk_size: u32,
}

impl ValidOffer {
    /// `folder/file.txt`.
    pub(crate) fn display_name(&self) -> String {
        self.components.join("/")
    }
}

/// Checks the name and the chunk size of an offer.
pub(crate) fn validate_offer(offer: Offer) -> Result<ValidOffer, Refusal> {
    let components = sanitise(&offer.name).map_err(Refusal::Name)?;
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&offer.chunk_size)
        || !crate::tree::valid_chunk_size(offer.chunk_size)
    {
        return Err(Refusal::Offer(format!(
            "the chunk size {} is not a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
            offer.chunk_size
        )));
    }
    Ok(ValidOffer {
        components,
        size: offer.size,
        hash: offer.hash,
        chunk_size: offer.chunk_size,
    })
}

/// Where to resume given a partial file of `partial_len` bytes: rounded down to a chunk boundary
/// and never past the size (bytes past it, or a torn last chunk, are sent again).
pub(crate) fn resume_offset(partial_len: u64, size: u64, chunk_size: u32) -> u64 {
    let chunk = u64::from(chunk_size.max(1));
    partial_len.min(size) / chunk * chunk
}

/// Room to keep free: `margin`, but at most 1 % of the file system (small disks, test tmpfs).
pub(crate) fn free_space_needed(needed: u64, fs_total: u64, margin: u64) -> u64 {
    needed.saturating_add(margin.min(fs_total / 100))
}

/// Checks that `needed` bytes fit in `free` (bytes available to us) on a file system of
/// `fs_total` bytes, keeping the margin.
pub(crate) fn check_space(
    free: u64,
    fs_total: u64,
    needed: u64,
    margin: u64,
) -> Result<(), (u64, u64)> {
    let want = free_space_needed(needed, fs_total, margin);
    if free >= want {
        Ok(())
    } else {
        Err((free, want))
    }
}

/// Bytes a session may still receive, shared by all of its transfers.
#[derive(Debug)]
pub(crate) struct Quota {
    limit: u64,
    used: Mutex<u64>,
}

/// Why a reservation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OverQuota {
    pub needed: u64,
    pub remaining: u64,
    pub limit: u64,
}

impl Quota {
    pub(crate) fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: Mutex::new(0),
        })
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes received or reserved.
    pub(crate) fn used(&self) -> u64 {
        *self.used.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves `amount`; released when the reservation drops, kept by [`Reservation::keep`].
    pub(crate) fn reserve(self: &Arc<Self>, amount: u64) -> Result<Reservation, OverQuota> {
        self.add(amount)?;
        Ok(Reservation {
            quota: Arc::clone(self),
            amount,
        })
    }

    fn add(&self, amount: u64) -> Result<(), OverQuota> {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        let remaining = self.limit.saturating_sub(*used);
        if amount > remaining {
            return Err(OverQuota {
                needed: amount,
                remaining,
                limit: self.limit,
            });
        }
        *used += amount;
        Ok(())
    }

    fn release(&self, amount: u64) {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        *used = used.saturating_sub(amount);
    }
}

/// Bytes held against a [`Quota`]; the unkept part goes back when it drops.
#[derive(Debug)]
pub(crate) struct Reservation {
    quota: Arc<Quota>,
    amount: u64,
}

impl Reservation {
    /// Changes the reserved amount (growing can fail).
    pub(crate) fn resize(&mut self, amount: u64) -> Result<(), OverQuota> {
        if amount > self.amount {
            self.quota.add(amount - self.amount)?;
        } else {
            self.quota.release(self.amount - amount);
        }
        self.amount = amount;
        Ok(())
    }

    /// Keeps `amount` of the reservation for good (bytes now on disk); the rest is released.
    pub(crate) fn keep(mut self, amount: u64) {
        let keep = amount.min(self.amount);
        self.quota.release(self.amount - keep);
        self.amount = 0;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.quota.release(self.amount);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::name::NameError;

    fn offer(name: &[u8], chunk_size: u32) -> Offer {
        Offer {
            name: name.to_vec(),
            size: 10,
            hash: [0; 32],
            chunk_size,
        }
    }

    #[test]
    fn offers_are_validated() {
        let ok = validate_offer(offer(b"d/f.txt", 65536)).unwrap();
        assert_eq!(ok.components, ["d", "f.txt"]);
        assert_eq!(ok.display_name(), "d/f.txt");
        assert_eq!(
            validate_offer(offer(b"../f", 65536)),
            Err(Refusal::Name(NameError::DotComponent("..")))
        );
        assert!(matches!(
            validate_offer(offer(b"f", 0)),
            Err(Refusal::Offer(_))
        ));
        assert!(matches!(
            validate_offer(offer(b"f", MAX_CHUNK_SIZE + 1)),
            Err(Refusal::Offer(_))
        ));
        assert!(validate_offer(offer(b"f", MAX_CHUNK_SIZE)).is_ok());
    }

    #[test]
    fn resume_rounds_down_to_a_chunk() {
        assert_eq!(resume_offset(0, 100, 10), 0);
        assert_eq!(resume_offset(9, 100, 10), 0);
        assert_eq!(resume_offset(55, 100, 10), 50);
        assert_eq!(resume_offset(100, 100, 10), 100);
        assert_eq!(resume_offset(500, 100, 10), 100);
        assert_eq!(resume_offset(95, 95, 10), 90);
        assert_eq!(resume_offset(7, 0, 10), 0);
    }

    #[test]
    fn space_keeps_a_margin() {
        let gb = 1_000_000_000;
        assert!(check_space(10 * gb, 1000 * gb, 5 * gb, 64 << 20).is_ok());
        assert_eq!(
            check_space(5 * gb, 1000 * gb, 5 * gb, 64 << 20),
            Err((5 * gb, 5 * gb + (64 << 20)))
        );
        // A 1 GB file system keeps 1 % (10 MB), not 64 MiB.
        assert!(check_space(100_000_000, gb, 89_000_000, 64 << 20).is_ok());
        assert!(check_space(100_000_000, gb, 91_000_000, 64 << 20).is_err());
    }

    #[test]
    fn quota_is_shared_and_released() {
        let q = Quota::new(100);
        let a = q.reserve(60).unwrap();
        assert_eq!(
            q.reserve(41).unwrap_err(),
            OverQuota {
                needed: 41,
                remaining: 40,
                limit: 100
            }
        );
        let mut b = q.reserve(40).unwrap();
        assert_eq!(q.used(), 100);
        drop(a);
        assert_eq!(q.used(), 40);
        b.resize(90).unwrap();
        assert!(b.resize(101).is_err());
        assert_eq!(q.used(), 90);
        b.keep(25);
        assert_eq!(q.used(), 25);
        assert_eq!(q.limit(), 100);
    }
}
