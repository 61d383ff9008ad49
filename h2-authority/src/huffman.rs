//! HPACK's Huffman code (RFC 7541 Appendix B), decoding only.
//!
//! The code is canonical: symbols sorted by (code length, symbol) take
//! consecutive codes. So the table is just each symbol's code length, and
//! decoding walks the lengths as a canonical decoder does, bit by bit. A
//! header value is at most a few KiB, so speed is not the point here;
//! strictness is (EOS in the data and padding longer than 7 bits or not all
//! ones are errors, RFC 7541 §5.2).

use crate::hpack::HpackError;

/// Code length of each symbol 0..=255 and of EOS (256), RFC 7541 Appendix B.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

const EOS: u16 = 256;
const MAX_CODE_LENGTH: usize = 30;

/// How many codes there are of each length.
const COUNTS: [u32; MAX_CODE_LENGTH + 1] = {
    let mut counts = [0u32; MAX_CODE_LENGTH + 1];
    let mut symbol = 0;
    while symbol < CODE_LENGTHS.len() {
        counts[CODE_LENGTHS[symbol] as usize] += 1;
        symbol += 1;
    }
    counts
};

/// Symbols in canonical order: by code length, then by symbol.
const SYMBOLS: [u16; 257] = {
    let mut symbols = [0u16; 257];
    let mut next = 0;
    let mut length = 1;
    while length <= MAX_CODE_LENGTH {
        let mut symbol = 0;
        while symbol < CODE_LENGTHS.len() {
            if CODE_LENGTHS[symbol] as usize == length {
                symbols[next] = symbol as u16;
                next += 1;
            }
            symbol += 1;
        }
        length += 1;
    }
    symbols
};

/// Decodes a Huffman-coded string literal.
pub(super) fn decode(input: &[u8]) -> Result<Vec<u8>, HpackError> {
    // Huffman never shrinks below 5 bits a symbol, so 8/5 bounds the output.
    let mut out = Vec::with_capacity(input.len() * 8 / 5 + 1);
    // Canonical decoding state for the symbol being read: its bits so far,
    // the first code of the current length and where that length's symbols
    // start in SYMBOLS.
    let mut code: u32 = 0;
    let mut first: u32 = 0;
    let mut index: u32 = 0;
    let mut length: usize = 0;
    // Whether every bit of the partial symbol is 1 (a valid EOS prefix).
    let mut all_ones = true;
    for byte in input {
        for shift in (0..8).rev() {
            let bit = u32::from((byte >> shift) & 1);
            code |= bit;
            all_ones &= bit == 1;
            length += 1;
            let count = COUNTS[length];
            // `code >= first` always holds for a complete canonical code.
            if code - first < count {
                let symbol = SYMBOLS[(index + code - first) as usize];
                if symbol == EOS {
                    return Err(HpackError::Huffman("EOS symbol in a string"));
                }
                out.push(symbol as u8);
                (code, first, index, length, all_ones) = (0, 0, 0, 0, true);
                continue;
            }
            if length == MAX_CODE_LENGTH {
                return Err(HpackError::Huffman("invalid code"));
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
    }
    if length > 7 {
        return Err(HpackError::Huffman("padding longer than 7 bits"));
    }
    if !all_ones {
        return Err(HpackError::Huffman("padding is not a prefix of EOS"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_is_complete() {
        // Kraft's sum is exactly 1: every bit string decodes or is a prefix.
        let sum: f64 = CODE_LENGTHS
            .iter()
            .map(|&l| 0.5f64.powi(i32::from(l)))
            .sum();
        assert!((sum - 1.0).abs() < 1e-12, "{sum}");
    }

    #[test]
    fn decodes_rfc7541_examples() {
        // RFC 7541 C.4.1-C.4.3 and C.6.1.
        let cases: [(&str, &str); 5] = [
            ("f1e3c2e5f23a6ba0ab90f4ff", "www.example.com"),
            ("a8eb10649cbf", "no-cache"),
            ("25a849e95ba97d7f", "custom-key"),
            ("25a849e95bb8e8b4bf", "custom-value"),
            ("6402", "302"),
        ];
        for (hex, text) in cases {
            let bytes = crate::tests::unhex(hex);
            assert_eq!(
                decode(&bytes).ok().as_deref(),
                Some(text.as_bytes()),
                "{hex}"
            );
        }
    }

    #[test]
    fn known_codes_of_single_symbols() {
        // '0' is 00000 (5 bits) padded with 111; 'a' is 00011.
        assert_eq!(decode(&[0b0000_0111]).ok(), Some(b"0".to_vec()));
        assert_eq!(decode(&[0b0001_1111]).ok(), Some(b"a".to_vec()));
        assert_eq!(decode(&[]).ok(), Some(Vec::new()));
    }

    #[test]
    fn refuses_bad_padding_and_eos() {
        // '0' followed by padding 110: not all ones.
        assert!(decode(&[0b0000_0110]).is_err());
        // A whole byte of ones is padding longer than 7 bits.
        assert!(decode(&[0b0000_0111, 0xff]).is_err());
        // EOS is 30 ones.
        assert!(decode(&[0xff, 0xff, 0xff, 0xfc]).is_err());
    }
}
