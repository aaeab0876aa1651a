//! CRC32C helpers: every ring entry, superblock and wire message carries one (invariant 5).
//!
//! A structure's own checksum field is computed as if it were zero, so the same function both
//! seals and verifies it.

/// CRC32C of `data`. `crc-fast` folds with (V)PCLMULQDQ where the CPU has it: about twice the
/// speed of the `crc32` instruction loop on a 4 KiB block, and every replicated block is
/// checksummed once on each side.
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::crc32_iscsi(data)
}

/// Continues a CRC32C over more bytes (`crc32c_append(crc32c(a), b) == crc32c(a ++ b)`).
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, data)
}

/// CRC32C of `bytes` with the 4-byte field at `field_offset` taken as zero.
pub fn crc32c_with_zero_field(bytes: &[u8], field_offset: usize) -> u32 {
    assert!(field_offset + 4 <= bytes.len());
    let crc = crc32c(&bytes[..field_offset]);
    let crc = crc32c_append(crc, &[0; 4]);
    crc32c_append(crc, &bytes[field_offset + 4..])
}

/// Little-endian fields of the on-ring and on-wire formats.
pub(crate) fn le_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().expect("2 bytes"))
}

pub(crate) fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

pub(crate) fn le_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector_and_append() {
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(
            crc32c_append(crc32c(b"1234"), b"56789"),
            crc32c(b"123456789")
        );
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn zero_field_is_ignored() {
        let mut bytes = *b"abcdEFGHijkl";
        let sealed = crc32c_with_zero_field(&bytes, 4);
        bytes[4..8].copy_from_slice(&sealed.to_le_bytes());
        assert_eq!(crc32c_with_zero_field(&bytes, 4), sealed);
        bytes[9] ^= 1;
        assert_ne!(crc32c_with_zero_field(&bytes, 4), sealed);
    }
}
