//! HPACK (RFC 7541): a strict decoder that keeps the peer's dynamic table,
//! and an encoder that only writes literals, so whoever decodes our output
//! never needs a dynamic table at all.

use std::collections::VecDeque;

use crate::huffman;

/// Why a header block could not be decoded. Any of these is a connection
/// error (COMPRESSION_ERROR) in HTTP/2: the tables are out of step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HpackError {
    /// The block ended inside a field.
    #[error("header block truncated")]
    Truncated,
    /// An integer longer than any size this decoder accepts.
    #[error("integer too large")]
    IntegerOverflow,
    /// Index 0, or past the end of the static and dynamic tables.
    #[error("header table index {0} out of range")]
    BadIndex(usize),
    /// A dynamic table size update above the limit we advertised, or after
    /// the first field of a block.
    #[error("dynamic table size update {0} not allowed")]
    BadSizeUpdate(usize),
    /// A Huffman-coded string that is not valid.
    #[error("Huffman: {0}")]
    Huffman(&'static str),
    /// The decoded headers are larger than the limit.
    #[error("header list larger than {0} bytes")]
    ListTooLarge(usize),
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Per-entry overhead counted in table and header list sizes (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

/// One decoded header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Lowercase in valid HTTP/2; not checked here (the server does).
    pub name: Vec<u8>,
    /// The value bytes.
    pub value: Vec<u8>,
    /// The sender asked that no intermediary ever index it (§6.2.3); we keep
    /// that when re-encoding.
    pub never_indexed: bool,
}

/// Decodes header blocks of one connection, in order.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first, as HPACK indexes it.
    dynamic: VecDeque<(Vec<u8>, Vec<u8>)>,
    dynamic_size: usize,
    /// Current maximum set by the peer's size updates.
    max_size: usize,
    /// The SETTINGS_HEADER_TABLE_SIZE the server advertised: size updates
    /// above it are errors, so the table's memory is bounded by it.
    size_limit: usize,
    /// Decoded size (names + values + 32 a field) above which a block is
    /// refused, so a small block of indexed fields cannot expand into
    /// megabytes.
    list_limit: usize,
}

impl Decoder {
    /// A decoder for a peer told `size_limit` as its table size, refusing
    /// blocks that decode to more than `list_limit` bytes.
    pub fn new(size_limit: usize, list_limit: usize) -> Self {
        Self {
            dynamic: VecDeque::new(),
            dynamic_size: 0,
            max_size: size_limit,
            size_limit,
            list_limit,
        }
    }

    /// Decodes one complete header block (HEADERS plus CONTINUATIONs).
    pub fn decode(&mut self, mut block: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut fields = Vec::new();
        let mut list_size = 0usize;
        let mut at_start = true;
        while let Some(&first) = block.first() {
            if first & 0b1110_0000 == 0b0010_0000 {
                let (size, rest) = integer(block, 5)?;
                if !at_start || size > self.size_limit {
                    return Err(HpackError::BadSizeUpdate(size));
                }
                self.max_size = size;
                self.evict_to(size);
                block = rest;
                continue;
            }
            at_start = false;
            let (field, rest) = self.field(block)?;
            block = rest;
            list_size += field.name.len() + field.value.len() + ENTRY_OVERHEAD;
            if list_size > self.list_limit {
                return Err(HpackError::ListTooLarge(self.list_limit));
            }
            fields.push(field);
        }
        Ok(fields)
    }

    /// One field representation (§6.1-6.2) at the start of `block`.
    fn field<'b>(&mut self, block: &'b [u8]) -> Result<(Field, &'b [u8]), HpackError> {
        let first = block[0];
        if first & 0x80 != 0 {
            let (index, rest) = integer(block, 7)?;
            let (name, value) = self.lookup(index)?;
            let field = Field {
                name: name.to_vec(),
                value: value.to_vec(),
                never_indexed: false,
            };
            return Ok((field, rest));
        }
        let (prefix, indexing, never_indexed) = if first & 0x40 != 0 {
            (6, true, false)
        } else {
            (4, false, first & 0x10 != 0)
        };
        let (index, rest) = integer(block, prefix)?;
        let (name, rest) = if index == 0 {
            string(rest)?
        } else {
            (self.lookup(index)?.0.to_vec(), rest)
        };
        let (value, rest) = string(rest)?;
        if indexing {
            self.insert(name.clone(), value.clone());
        }
        let field = Field {
            name,
            value,
            never_indexed,
        };
        Ok((field, rest))
    }

    fn lookup(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        if index == 0 {
            return Err(HpackError::BadIndex(index));
        }
        if let Some((name, value)) = STATIC_TABLE.get(index - 1) {
            return Ok((name.as_bytes(), value.as_bytes()));
        }
        self.dynamic
            .get(index - 1 - STATIC_TABLE.len())
            .map(|(n, v)| (n.as_slice(), v.as_slice()))
            .ok_or(HpackError::BadIndex(index))
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.max_size {
            // §4.4: an entry larger than the table empties it and is not kept.
            self.evict_to(0);
            return;
        }
        self.evict_to(self.max_size - size);
        self.dynamic_size += size;
        self.dynamic.push_front((name, value));
    }

    fn evict_to(&mut self, size: usize) {
        while self.dynamic_size > size {
            match self.dynamic.pop_back() {
                Some((n, v)) => self.dynamic_size -= n.len() + v.len() + ENTRY_OVERHEAD,
                None => break,
            }
        }
    }
}

/// The largest integer we decode: more than any frame, table or string we
/// accept, far below overflow.
const MAX_INTEGER: usize = 1 << 24;

/// An integer with an `n`-bit prefix (§5.1) at the start of `input`.
fn integer(input: &[u8], n: u32) -> Result<(usize, &[u8]), HpackError> {
    let (&first, mut rest) = input.split_first().ok_or(HpackError::Truncated)?;
    let max_prefix = (1usize << n) - 1;
    let mut value = usize::from(first) & max_prefix;
    if value < max_prefix {
        return Ok((value, rest));
    }
    // Four continuation bytes (28 bits) cover MAX_INTEGER; a fifth, even a
    // zero one, is refused rather than shifted past the word (as h2 does).
    for shift in [0, 7, 14, 21] {
        let (&byte, tail) = rest.split_first().ok_or(HpackError::Truncated)?;
        rest = tail;
        value += usize::from(byte & 0x7f) << shift;
        if value > MAX_INTEGER {
            return Err(HpackError::IntegerOverflow);
        }
        if byte & 0x80 == 0 {
            return Ok((value, rest));
        }
    }
    Err(HpackError::IntegerOverflow)
}

/// A string literal (§5.2) at the start of `input`.
fn string(input: &[u8]) -> Result<(Vec<u8>, &[u8]), HpackError> {
    let huffman_coded = input.first().is_some_and(|b| b & 0x80 != 0);
    let (len, rest) = integer(input, 7)?;
    if len > rest.len() {
        return Err(HpackError::Truncated);
    }
    let (raw, rest) = rest.split_at(len);
    let text = if huffman_coded {
        huffman::decode(raw)?
    } else {
        raw.to_vec()
    };
    Ok((text, rest))
}

/// Appends `fields` as literals with a literal name and no indexing (or
/// never-indexed where the sender asked for it), plain (not Huffman), so the
/// decoder's dynamic table is never touched.
pub fn encode_literals(fields: &[Field], out: &mut Vec<u8>) {
    for field in fields {
        out.push(if field.never_indexed { 0x10 } else { 0x00 });
        for bytes in [&field.name, &field.value] {
            encode_integer(bytes.len(), 7, 0x00, out);
            out.extend_from_slice(bytes);
        }
    }
}

/// An integer with an `n`-bit prefix whose other bits are `flags` (§5.1).
fn encode_integer(mut value: usize, n: u32, flags: u8, out: &mut Vec<u8>) {
    let max_prefix = (1usize << n) - 1;
    if value < max_prefix {
        // Fits in the prefix, which is at most 7 bits.
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max_prefix as u8);
    value -= max_prefix;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::unhex;

    fn pairs(fields: &[Field]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|f| {
                (
                    String::from_utf8_lossy(&f.name).into_owned(),
                    String::from_utf8_lossy(&f.value).into_owned(),
                )
            })
            .collect()
    }

    fn expect(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn integers_as_rfc7541_c1() {
        assert_eq!(integer(&[0b0000_1010], 5), Ok((10, &[][..])));
        assert_eq!(integer(&[0x1f, 0x9a, 0x0a], 5), Ok((1337, &[][..])));
        assert_eq!(integer(&[42], 8), Ok((42, &[][..])));
        assert_eq!(integer(&[0x1f, 0x9a], 5), Err(HpackError::Truncated));
        assert_eq!(
            integer(&[0x1f, 0xff, 0xff, 0xff, 0xff, 0x7f], 5),
            Err(HpackError::IntegerOverflow)
        );
        // Found by the fuzzer: zero continuation bytes add nothing but used
        // to shift past the word.
        let mut zeros = vec![0x1f];
        zeros.extend([0x80; 20]);
        zeros.push(0x00);
        assert_eq!(integer(&zeros, 5), Err(HpackError::IntegerOverflow));
        // Redundant zeros within four continuation bytes are accepted.
        assert_eq!(integer(&[0x1f, 0x81, 0x80, 0x00], 5), Ok((32, &[][..])));
        for value in [0, 30, 31, 126, 127, 128, 1337, 70_000] {
            let mut out = Vec::new();
            encode_integer(value, 7, 0, &mut out);
            assert_eq!(integer(&out, 7), Ok((value, &[][..])), "{value}");
        }
    }

    /// RFC 7541 C.3 (plain) and C.4 (Huffman): three requests on one
    /// connection, the later ones indexing what the first ones added.
    #[test]
    fn decodes_rfc7541_request_sequences() {
        let sequences = [
            [
                "828684410f7777772e6578616d706c652e636f6d",
                "828684be58086e6f2d6361636865",
                "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
            ],
            [
                "828684418cf1e3c2e5f23a6ba0ab90f4ff",
                "828684be5886a8eb10649cbf",
                "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
            ],
        ];
        for blocks in sequences {
            let mut decoder = Decoder::new(4096, 65536);
            let first = decoder.decode(&unhex(blocks[0])).unwrap_or_default();
            assert_eq!(
                pairs(&first),
                expect(&[
                    (":method", "GET"),
                    (":scheme", "http"),
                    (":path", "/"),
                    (":authority", "www.example.com"),
                ])
            );
            let second = decoder.decode(&unhex(blocks[1])).unwrap_or_default();
            assert_eq!(
                pairs(&second)[3],
                expect(&[(":authority", "www.example.com")])[0]
            );
            assert_eq!(
                pairs(&second)[4],
                expect(&[("cache-control", "no-cache")])[0]
            );
            let third = decoder.decode(&unhex(blocks[2])).unwrap_or_default();
            assert_eq!(
                pairs(&third),
                expect(&[
                    (":method", "GET"),
                    (":scheme", "https"),
                    (":path", "/index.html"),
                    (":authority", "www.example.com"),
                    ("custom-key", "custom-value"),
                ])
            );
            assert_eq!(decoder.dynamic_size, 164);
        }
    }

    #[test]
    fn evicts_as_rfc7541_c5_with_a_256_byte_table() {
        // C.5.1-C.5.3: response headers with a table of 256 bytes.
        let mut decoder = Decoder::new(256, 65536);
        decoder.decode(&[0x3f, 0xe1, 0x01]).unwrap_or_default(); // size update to 256
        let blocks = [
            "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d",
            "4803333037c1c0bf",
        ];
        decoder.decode(&unhex(blocks[0])).unwrap_or_default();
        assert_eq!(decoder.dynamic_size, 222);
        let second = decoder.decode(&unhex(blocks[1])).unwrap_or_default();
        assert_eq!(pairs(&second)[0], expect(&[(":status", "307")])[0]);
        assert_eq!(pairs(&second)[3].0, "location");
        assert_eq!(decoder.dynamic_size, 222);
        assert_eq!(decoder.dynamic.len(), 4);
    }

    #[test]
    fn refuses_bad_blocks() {
        let mut d = Decoder::new(4096, 65536);
        assert_eq!(d.decode(&[0x80]), Err(HpackError::BadIndex(0)));
        assert_eq!(d.decode(&[0xbe]), Err(HpackError::BadIndex(62)));
        // A size update above the advertised limit, and one after a field.
        assert_eq!(
            d.decode(&[0x3f, 0xe2, 0x1f]),
            Err(HpackError::BadSizeUpdate(4097))
        );
        assert_eq!(d.decode(&[0x82, 0x20]), Err(HpackError::BadSizeUpdate(0)));
        // A string claiming more bytes than there are.
        assert_eq!(d.decode(&[0x00, 0x05, b'a']), Err(HpackError::Truncated));
        assert_eq!(d.decode(&[0x00]), Err(HpackError::Truncated));
    }

    #[test]
    fn bounds_the_decoded_list() {
        // One literal of 100 bytes indexed, then referenced 1,000 times: a
        // 1 KiB block that would decode to over 100 KiB.
        let mut block = vec![0x40, 0x01, b'x', 100];
        block.extend(std::iter::repeat_n(b'v', 100));
        block.extend(std::iter::repeat_n(0xbe, 1000));
        let mut d = Decoder::new(4096, 16384);
        assert_eq!(d.decode(&block), Err(HpackError::ListTooLarge(16384)));
    }

    #[test]
    fn literals_round_trip_without_touching_the_table() {
        let fields = vec![
            Field {
                name: b":authority".to_vec(),
                value: b"localhost".to_vec(),
                never_indexed: false,
            },
            Field {
                name: b"authorization".to_vec(),
                value: vec![b'k'; 300],
                never_indexed: true,
            },
        ];
        let mut out = Vec::new();
        encode_literals(&fields, &mut out);
        let mut d = Decoder::new(4096, 65536);
        assert_eq!(d.decode(&out), Ok(fields));
        assert_eq!(d.dynamic_size, 0);
    }
}
