//! Golden wire bytes for every SPIFFE Workload API message.
//!
//! Each expected byte string is written out by hand from the field numbers and
//! wire types of the SPIFFE specification, not produced by prost. A tag byte is
//! `(field_number << 3) | wire_type` with wire types VARINT = 0, I64 = 1 and
//! LEN = 2; a LEN field is followed by its length and then its payload. A map
//! field is a repeated LEN field whose payload is an entry message with the key
//! as field 1 and the value as field 2.
//!
//! Every test both encodes a value (which must give exactly the hand bytes) and
//! decodes the hand bytes (which must give back the value), so a renumbered
//! field, a changed type or a changed wire type makes it fail. Values are built
//! with full struct literals (no `..Default::default()`), so a field added to
//! the proto stops this file from compiling until it is covered here.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;

use oxid_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use prost::Message;
use prost_types::{ListValue, Struct, Value, value::Kind};

/// Concatenates hand-written pieces (tag bytes, lengths, payload literals).
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// `value` must encode to exactly `bytes`, and `bytes` must decode to `value`.
fn assert_golden<M: Message + Default + PartialEq + Debug>(value: &M, bytes: &[u8]) {
    assert_eq!(
        value.encode_to_vec(),
        bytes,
        "encoding differs from the golden bytes"
    );
    assert_eq!(value.encoded_len(), bytes.len(), "encoded_len");
    let decoded = M::decode(bytes);
    assert_eq!(decoded.as_ref(), Ok(value), "decoding the golden bytes");
}

/// An empty request message: encodes to no bytes, and has no fields at all, so
/// decoding bytes that use fields 1 to 5 with every wire type keeps none of
/// them (prost skips unknown fields) instead of failing on a type mismatch.
fn assert_empty_message<M: Message + Default + PartialEq + Debug>(value: &M) {
    assert_golden(value, &[]);
    let unknown = cat(&[
        &[0x08, 0x01],                   // field 1, VARINT: 1
        &[0x11, 0, 0, 0, 0, 0, 0, 0, 0], // field 2, I64: 0
        &[0x1a, 0x01, 0x61],             // field 3, LEN 1: "a"
        &[0x25, 0, 0, 0, 0],             // field 4, I32
        &[0x2a, 0x00],                   // field 5, LEN 0
    ]);
    let decoded = M::decode(unknown.as_slice());
    assert_eq!(
        decoded.as_ref(),
        Ok(value),
        "unknown fields must be skipped"
    );
    assert_eq!(decoded.map(|m| m.encode_to_vec()), Ok(Vec::new()));
}

/// `X509SVID` with every field set; 40 bytes.
fn x509_svid_a() -> (X509svid, Vec<u8>) {
    let value = X509svid {
        spiffe_id: "spiffe://td/a".to_owned(),
        x509_svid: vec![0xc1, 0xc2],
        x509_svid_key: vec![0x4b, 0x45, 0x59],
        bundle: vec![0xb0, 0xb1, 0xb2, 0xb3],
        hint: "internal".to_owned(),
    };
    let bytes = cat(&[
        &[0x0a, 0x0d], // field 1 spiffe_id, LEN 13
        b"spiffe://td/a",
        &[0x12, 0x02], // field 2 x509_svid, LEN 2
        &[0xc1, 0xc2],
        &[0x1a, 0x03], // field 3 x509_svid_key, LEN 3
        &[0x4b, 0x45, 0x59],
        &[0x22, 0x04], // field 4 bundle, LEN 4
        &[0xb0, 0xb1, 0xb2, 0xb3],
        &[0x2a, 0x08], // field 5 hint, LEN 8
        b"internal",
    ]);
    assert_eq!(bytes.len(), 0x28);
    (value, bytes)
}

/// `X509SVID` without a hint: proto3 leaves the empty string off the wire; 24 bytes.
fn x509_svid_b() -> (X509svid, Vec<u8>) {
    let value = X509svid {
        spiffe_id: "spiffe://td/b".to_owned(),
        x509_svid: vec![0xc3],
        x509_svid_key: vec![0x4b],
        bundle: vec![0xb4],
        hint: String::new(),
    };
    let bytes = cat(&[
        &[0x0a, 0x0d], // field 1 spiffe_id, LEN 13
        b"spiffe://td/b",
        &[0x12, 0x01, 0xc3], // field 2 x509_svid, LEN 1
        &[0x1a, 0x01, 0x4b], // field 3 x509_svid_key, LEN 1
        &[0x22, 0x01, 0xb4], // field 4 bundle, LEN 1
    ]); // no field 5: an empty hint is not encoded
    assert_eq!(bytes.len(), 0x18);
    (value, bytes)
}

#[test]
fn x509_svid_request_is_empty() {
    assert_empty_message(&X509svidRequest {});
}

#[test]
fn x509_svid() {
    let (value, bytes) = x509_svid_a();
    assert_golden(&value, &bytes);
    let (value, bytes) = x509_svid_b();
    assert_golden(&value, &bytes);
}

#[test]
fn x509_svid_response() {
    let (svid_a, svid_a_bytes) = x509_svid_a();
    let (svid_b, svid_b_bytes) = x509_svid_b();
    let value = X509svidResponse {
        svids: vec![svid_a, svid_b],
        crl: vec![vec![0xd1], vec![0xd2, 0xd3]],
        // One entry only: HashMap iteration order would make the encoding of
        // two entries nondeterministic (see `map_with_two_entries_decodes`).
        federated_bundles: HashMap::from([("spiffe://other".to_owned(), vec![0xf1, 0xf2])]),
    };
    let bytes = cat(&[
        &[0x0a, 0x28], // field 1 svids, LEN 40: first X509SVID
        &svid_a_bytes,
        &[0x0a, 0x18], // field 1 svids, LEN 24: second X509SVID
        &svid_b_bytes,
        &[0x12, 0x01, 0xd1], // field 2 crl, LEN 1 (repeated bytes: one record each)
        &[0x12, 0x02, 0xd2, 0xd3], // field 2 crl, LEN 2
        &[0x1a, 0x14],       // field 3 federated_bundles, LEN 20: map entry
        &[0x0a, 0x0e],       //   entry field 1 key, LEN 14
        b"spiffe://other",
        &[0x12, 0x02, 0xf1, 0xf2], //   entry field 2 value, LEN 2
    ]);
    assert_golden(&value, &bytes);
}

#[test]
fn x509_bundles_request_is_empty() {
    assert_empty_message(&X509BundlesRequest {});
}

#[test]
fn x509_bundles_response() {
    let value = X509BundlesResponse {
        crl: vec![vec![0xd1]],
        bundles: HashMap::from([("spiffe://td".to_owned(), vec![0xb0, 0xb1, 0xb2])]),
    };
    let bytes = cat(&[
        &[0x0a, 0x01, 0xd1], // field 1 crl, LEN 1
        &[0x12, 0x12],       // field 2 bundles, LEN 18: map entry
        &[0x0a, 0x0b],       //   entry field 1 key, LEN 11
        b"spiffe://td",
        &[0x12, 0x03, 0xb0, 0xb1, 0xb2], //   entry field 2 value, LEN 3
    ]);
    assert_golden(&value, &bytes);
}

/// Map entries may come in any order on the wire; both must be kept.
#[test]
fn map_with_two_entries_decodes() {
    let bytes = cat(&[
        &[0x12, 0x0f], // field 2 bundles, LEN 15: map entry
        &[0x0a, 0x0a], //   entry field 1 key, LEN 10
        b"spiffe://b",
        &[0x12, 0x01, 0xbb], //   entry field 2 value, LEN 1
        &[0x12, 0x0f],       // field 2 bundles, LEN 15: map entry
        &[0x0a, 0x0a],       //   entry field 1 key, LEN 10
        b"spiffe://a",
        &[0x12, 0x01, 0xaa], //   entry field 2 value, LEN 1
    ]);
    let expected = X509BundlesResponse {
        crl: Vec::new(),
        bundles: HashMap::from([
            ("spiffe://a".to_owned(), vec![0xaa]),
            ("spiffe://b".to_owned(), vec![0xbb]),
        ]),
    };
    let decoded = X509BundlesResponse::decode(bytes.as_slice());
    assert_eq!(decoded.as_ref(), Ok(&expected));
    // Re-encoding gives the same bytes up to the order of the two entries.
    let reencoded = expected.encode_to_vec();
    assert_eq!(reencoded.len(), bytes.len());
    assert_eq!(
        X509BundlesResponse::decode(reencoded.as_slice()),
        Ok(expected)
    );
}

#[test]
fn jwt_svid_request() {
    let value = JwtsvidRequest {
        audience: vec!["db".to_owned(), "web".to_owned()],
        spiffe_id: "spiffe://td/a".to_owned(),
    };
    let bytes = cat(&[
        &[0x0a, 0x02], // field 1 audience, LEN 2 (repeated string: one record each)
        b"db",
        &[0x0a, 0x03], // field 1 audience, LEN 3
        b"web",
        &[0x12, 0x0d], // field 2 spiffe_id, LEN 13
        b"spiffe://td/a",
    ]);
    assert_golden(&value, &bytes);
}

#[test]
fn jwt_svid() {
    let value = Jwtsvid {
        spiffe_id: "spiffe://td/a".to_owned(),
        svid: "h.p.s".to_owned(),
        hint: "ext".to_owned(),
    };
    let bytes = cat(&[
        &[0x0a, 0x0d], // field 1 spiffe_id, LEN 13
        b"spiffe://td/a",
        &[0x12, 0x05], // field 2 svid, LEN 5
        b"h.p.s",
        &[0x1a, 0x03], // field 3 hint, LEN 3
        b"ext",
    ]);
    assert_golden(&value, &bytes);
}

#[test]
fn jwt_svid_response() {
    let value = JwtsvidResponse {
        svids: vec![
            Jwtsvid {
                spiffe_id: "spiffe://td/a".to_owned(),
                svid: "h.p.s".to_owned(),
                hint: "ext".to_owned(),
            },
            Jwtsvid {
                spiffe_id: "spiffe://td/b".to_owned(),
                svid: "x.y.z".to_owned(),
                hint: String::new(),
            },
        ],
    };
    let bytes = cat(&[
        &[0x0a, 0x1b], // field 1 svids, LEN 27: first JWTSVID
        &[0x0a, 0x0d], //   field 1 spiffe_id, LEN 13
        b"spiffe://td/a",
        &[0x12, 0x05], //   field 2 svid, LEN 5
        b"h.p.s",
        &[0x1a, 0x03], //   field 3 hint, LEN 3
        b"ext",
        &[0x0a, 0x16], // field 1 svids, LEN 22: second JWTSVID
        &[0x0a, 0x0d], //   field 1 spiffe_id, LEN 13
        b"spiffe://td/b",
        &[0x12, 0x05], //   field 2 svid, LEN 5
        b"x.y.z",
    ]);
    assert_golden(&value, &bytes);
}

#[test]
fn jwt_bundles_request_is_empty() {
    assert_empty_message(&JwtBundlesRequest {});
}

#[test]
fn jwt_bundles_response() {
    let value = JwtBundlesResponse {
        bundles: HashMap::from([("spiffe://td".to_owned(), br#"{"keys":[]}"#.to_vec())]),
    };
    let bytes = cat(&[
        &[0x0a, 0x1a], // field 1 bundles, LEN 26: map entry
        &[0x0a, 0x0b], //   entry field 1 key, LEN 11
        b"spiffe://td",
        &[0x12, 0x0b], //   entry field 2 value, LEN 11
        br#"{"keys":[]}"#,
    ]);
    assert_golden(&value, &bytes);
}

#[test]
fn validate_jwt_svid_request() {
    let value = ValidateJwtsvidRequest {
        audience: "db".to_owned(),
        svid: "h.p.s".to_owned(),
    };
    let bytes = cat(&[
        &[0x0a, 0x02], // field 1 audience, LEN 2 (a single string, not repeated)
        b"db",
        &[0x12, 0x05], // field 2 svid, LEN 5
        b"h.p.s",
    ]);
    assert_golden(&value, &bytes);
}

#[test]
fn validate_jwt_svid_response() {
    let string = |s: &str| Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    };
    // `Struct.fields` is a BTreeMap, so entries are encoded sorted by key and
    // several of them still give deterministic bytes.
    let claims = Struct {
        fields: BTreeMap::from([
            (
                "aud".to_owned(),
                Value {
                    kind: Some(Kind::ListValue(ListValue {
                        values: vec![string("db")],
                    })),
                },
            ),
            (
                "exp".to_owned(),
                Value {
                    kind: Some(Kind::NumberValue(1_700_000_000.0)),
                },
            ),
            ("sub".to_owned(), string("spiffe://td/a")),
        ]),
    };
    let value = ValidateJwtsvidResponse {
        spiffe_id: "spiffe://td/a".to_owned(),
        claims: Some(claims),
    };
    let bytes = cat(&[
        &[0x0a, 0x0d], // field 1 spiffe_id, LEN 13
        b"spiffe://td/a",
        &[0x12, 0x3b], // field 2 claims (google.protobuf.Struct), LEN 59
        &[0x0a, 0x0f], //   Struct field 1 fields, LEN 15: map entry
        &[0x0a, 0x03], //     entry field 1 key, LEN 3
        b"aud",
        &[0x12, 0x08], //     entry field 2 value (Value), LEN 8
        &[0x32, 0x06], //       Value field 6 list_value, LEN 6
        &[0x0a, 0x04], //         ListValue field 1 values, LEN 4
        &[0x1a, 0x02], //           Value field 3 string_value, LEN 2
        b"db",
        &[0x0a, 0x10], //   Struct field 1 fields, LEN 16: map entry
        &[0x0a, 0x03], //     entry field 1 key, LEN 3
        b"exp",
        &[0x12, 0x09], //     entry field 2 value (Value), LEN 9
        &[0x11],       //       Value field 2 number_value, I64 (double)
        &[0x00, 0x00, 0x00, 0x40, 0xfc, 0x54, 0xd9, 0x41], // 1.7e9 as little-endian f64
        &[0x0a, 0x16], //   Struct field 1 fields, LEN 22: map entry
        &[0x0a, 0x03], //     entry field 1 key, LEN 3
        b"sub",
        &[0x12, 0x0f], //     entry field 2 value (Value), LEN 15
        &[0x1a, 0x0d], //       Value field 3 string_value, LEN 13
        b"spiffe://td/a",
    ]);
    assert_golden(&value, &bytes);
}

/// `claims` is a message field, so it has presence: an empty Struct is sent as
/// a zero-length record, and an absent one is not sent at all.
#[test]
fn validate_jwt_svid_response_claims_presence() {
    let empty_claims = ValidateJwtsvidResponse {
        spiffe_id: String::new(),
        claims: Some(Struct {
            fields: BTreeMap::new(),
        }),
    };
    assert_golden(&empty_claims, &[0x12, 0x00]); // field 2 claims, LEN 0
    let no_claims = ValidateJwtsvidResponse {
        spiffe_id: String::new(),
        claims: None,
    };
    assert_golden(&no_claims, &[]);
}

/// The agent API's sync request, with `incarnation` (field 3, added later:
/// an older agent sends none, and an older server skips it).
#[test]
fn sync_request() {
    let value = oxid_proto::agent::SyncRequest {
        revision: 5,
        known_entry_ids: vec!["e1".into()],
        incarnation: "i9".into(),
    };
    let bytes = cat(&[
        &[0x08, 0x05],             // field 1 revision, VARINT: 5
        &[0x12, 0x02, b'e', b'1'], // field 2 known_entry_ids, LEN 2
        &[0x1a, 0x02, b'i', b'9'], // field 3 incarnation, LEN 2
    ]);
    assert_golden(&value, &bytes);
}

/// A sync page, with `incarnation` (field 8, added later). Entries are not
/// set here.
#[test]
fn sync_response() {
    let value = oxid_proto::agent::SyncResponse {
        revision: 7,
        snapshot: true,
        more: true,
        upserts: vec![],
        removed_ids: vec!["r".into()],
        bundles: vec![oxid_proto::agent::Bundle {
            trust_domain: "a".into(),
            spiffe_json: "{}".into(),
        }],
        removed_bundles: vec!["td".into()],
        incarnation: "i9".into(),
    };
    let bytes = cat(&[
        &[0x08, 0x07],             // field 1 revision, VARINT: 7
        &[0x10, 0x01],             // field 2 snapshot, VARINT: true
        &[0x18, 0x01],             // field 3 more, VARINT: true
        &[0x2a, 0x01, b'r'],       // field 5 removed_ids, LEN 1
        &[0x32, 0x07],             // field 6 bundles, LEN 7: a Bundle
        &[0x0a, 0x01, b'a'],       //   field 1 trust_domain, LEN 1
        &[0x12, 0x02, b'{', b'}'], //   field 2 spiffe_json, LEN 2
        &[0x3a, 0x02, b't', b'd'], // field 7 removed_bundles, LEN 2
        &[0x42, 0x02, b'i', b'9'], // field 8 incarnation, LEN 2
    ]);
    assert_golden(&value, &bytes);
}
