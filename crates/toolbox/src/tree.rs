//! Chunk hashes that are pieces of the file's own BLAKE3 hash.
//!
//! A chunk's hash on the wire is its BLAKE3 *chaining value* at its offset (BLAKE3's tree, through
//! [`blake3::hazmat`], as Bao does), not a separate hash of its bytes. So each byte is hashed once
//! on each side: the receiver checks every chunk as it arrives, and the whole file's hash is then
//! merged from the chunks' values (no second pass over the data), and the sender's first pass
//! (for the offer) gives it every chunk's value, so nothing is hashed while sending. Measured with
//! `--bench toolbox` (256 MiB through the relay on 2 cores): three passes of BLAKE3 in all
//! (sender's chunks, receiver's chunks, receiver's whole file) gave 0.77 of the session's raw
//! stream throughput.
//!
//! Valid because chunks have a power-of-two size of at least [`blake3::CHUNK_LEN`] bytes and all
//! but the last are full: every chunk is then a complete BLAKE3 subtree, and the tree's left
//! subtrees (the largest power of two below each length) fall on chunk boundaries. A file of one
//! chunk has no subtrees: its chunk hash is the file's root hash. Checked against
//! [`blake3::hash`] in the tests.

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

/// Whether `chunk_size` can carry tree hashes (a power of two, at least a BLAKE3 chunk).
pub(crate) fn valid_chunk_size(chunk_size: u32) -> bool {
    chunk_size.is_power_of_two() && chunk_size as usize >= blake3::CHUNK_LEN
}

/// The hash of the chunk `data` at `offset` of a file of `size` bytes.
pub(crate) fn chunk_hash(data: &[u8], offset: u64, size: u64) -> [u8; 32] {
    chunk_hash_with(data, offset, size, false)
}

/// [`chunk_hash`], on every core when `parallel` (the sender's first pass, when nothing else
/// runs; while data flows the cores are busy with the transfer itself).
pub(crate) fn chunk_hash_with(data: &[u8], offset: u64, size: u64, parallel: bool) -> [u8; 32] {
    if offset == 0 && data.len() as u64 == size {
        // The only chunk: its hash is the file's.
        return *blake3::hash(data).as_bytes();
    }
    let mut h = blake3::Hasher::new();
    h.set_input_offset(offset);
    if parallel && data.len() >= 128 * 1024 {
        h.update_rayon(data);
    } else {
        h.update(data);
    }
    h.finalize_non_root()
}

/// The file's hash from its chunks' hashes, in order (`chunk` bytes each, the last one shorter or
/// equal). `None` if the count does not fit `size` and `chunk`.
pub(crate) fn root(cvs: &[[u8; 32]], size: u64, chunk: u64) -> Option<blake3::Hash> {
    if chunk == 0 || cvs.len() as u64 != size.div_ceil(chunk).max(1) {
        return None;
    }
    if size <= chunk {
        return Some(blake3::Hash::from_bytes(cvs[0]));
    }
    let left = left_subtree_len(size);
    let l = subtree(cvs, 0, left, chunk)?;
    let r = subtree(cvs, left, size, chunk)?;
    Some(merge_subtrees_root(&l, &r, Mode::Hash))
}

/// The chaining value of bytes `start..end` (a subtree of whole chunks, the last possibly short).
fn subtree(cvs: &[[u8; 32]], start: u64, end: u64, chunk: u64) -> Option<ChainingValue> {
    if !start.is_multiple_of(chunk) {
        return None;
    }
    if end - start <= chunk {
        return cvs.get(usize::try_from(start / chunk).ok()?).copied();
    }
    let mid = start + left_subtree_len(end - start);
    let l = subtree(cvs, start, mid, chunk)?;
    let r = subtree(cvs, mid, end, chunk)?;
    Some(merge_subtrees_non_root(&l, &r, Mode::Hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n as u64)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
            .collect()
    }

    fn via_chunks(d: &[u8], chunk: usize) -> blake3::Hash {
        let size = d.len() as u64;
        let cvs: Vec<[u8; 32]> = if d.is_empty() {
            vec![chunk_hash(d, 0, 0)]
        } else {
            d.chunks(chunk)
                .enumerate()
                .map(|(i, c)| chunk_hash(c, (i * chunk) as u64, size))
                .collect()
        };
        root(&cvs, size, chunk as u64).unwrap()
    }

    #[test]
    fn the_root_from_chunk_hashes_is_blake3_of_the_file() {
        for chunk in [1024usize, 4096, 64 * 1024, 256 * 1024] {
            for n in [
                0,
                1,
                chunk - 1,
                chunk,
                chunk + 1,
                2 * chunk,
                3 * chunk + 17,
                5 * chunk,
                7 * chunk - 1,
                8 * chunk,
                9 * chunk + 1,
                13 * chunk + 1000,
            ] {
                let d = data(n);
                assert_eq!(
                    via_chunks(&d, chunk),
                    blake3::hash(&d),
                    "chunk {chunk}, {n} bytes"
                );
            }
        }
    }

    #[test]
    fn a_changed_or_missing_chunk_changes_the_root_and_bad_counts_are_refused() {
        let chunk = 4096usize;
        let mut d = data(10 * chunk + 5);
        let good = via_chunks(&d, chunk);
        d[3 * chunk + 9] ^= 1;
        assert_ne!(via_chunks(&d, chunk), good);
        let cvs = vec![[0u8; 32]; 3];
        assert!(root(&cvs, 10 * chunk as u64, chunk as u64).is_none());
        assert!(!valid_chunk_size(3000));
        assert!(!valid_chunk_size(512));
        assert!(valid_chunk_size(256 * 1024));
    }
}
