//! The stable map from a key to its shard.
//!
//! `shard = (fmix64(fnv1a64(utf8 bytes of key)) * shard_count) >> 64`, computed in 128 bits.
//! FNV-1a and murmur3's `fmix64` finalizer are a few lines in any language, so a client can
//! route by itself later. The finalizer is needed: raw FNV-1a mixes its last byte into the
//! low bits only (keys `account:1`..`account:9` would crowd into few shards), and the
//! multiply-shift reduction reads the high bits. The function must never change: durable
//! state and, later, the cluster's shard map depend on it.

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash = FNV_OFFSET_BASIS;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// murmur3's 64-bit finalizer: every input bit affects every output bit.
pub fn fmix64(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// The stable 64-bit hash of a key: `fmix64(fnv1a64(key))`.
pub fn key_hash(key: &str) -> u64 {
    fmix64(fnv1a64(key.as_bytes()))
}

/// The shard, in `0..shard_count`, that owns `key`.
///
/// # Panics
/// If `shard_count` is zero.
pub fn shard_for_key(key: &str, shard_count: usize) -> usize {
    assert!(shard_count > 0, "shard_count must be positive");
    ((u128::from(key_hash(key)) * shard_count as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    const PINNED_SHARDS_OF_4: [usize; 6] = [0, 3, 0, 2, 3, 1];

    #[test]
    fn fnv1a64_matches_the_reference_vectors() {
        // From the FNV reference test suite.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn shard_assignment_is_stable() {
        // Pinned: changing these breaks every stored data directory. See SPEC.md.
        assert_eq!(key_hash(""), fmix64(0xcbf2_9ce4_8422_2325));
        let shards: std::vec::Vec<usize> = ["alice", "bob", "carol", "dave", "", "ключ"]
            .iter()
            .map(|key| shard_for_key(key, 4))
            .collect();
        assert_eq!(shards, PINNED_SHARDS_OF_4);
        // The vectors quoted in SPEC.md.
        assert_eq!(key_hash("alice"), 0x3507_d047_a67c_08f4);
        assert_eq!(key_hash("bob"), 0xf649_3629_e565_4ae0);
        assert_eq!(key_hash(""), 0xefd0_1f60_ba99_2926);
    }

    #[test]
    fn shards_are_in_range_and_spread_evenly() {
        for shard_count in [1usize, 2, 3, 7, 16] {
            let mut counts = std::vec![0usize; shard_count];
            for i in 0..10_000 {
                let key = std::format!("account:{i}");
                let shard = shard_for_key(&key, shard_count);
                counts[shard] += 1;
            }
            let expected = 10_000 / shard_count;
            for count in counts {
                assert!(
                    count > expected * 8 / 10 && count < expected * 12 / 10,
                    "{count} vs {expected}"
                );
            }
        }
    }
}
