//! Conformance vectors for SPIFFE ID and trust domain parsing.
//!
//! Where the vectors come from:
//!
//! - The SPIFFE ID specification, `standards/SPIFFE-ID.md` in `spiffe/spiffe`:
//!   §2 (scheme `spiffe`, non-empty trust domain, no query, no fragment),
//!   §2.1 (trust domain: no userinfo, no port, lowercase `[a-z0-9.-_]` only, no
//!   percent-encoding; IPv4 dotted quads allowed, IPv6 literals excluded),
//!   §2.1.1 (example `trust_domain_name.example.com`),
//!   §2.2 (path: segments `[a-zA-Z0-9.-_]` only, no percent-encoding, no empty,
//!   `.` or `..` segments, no trailing `/`; the example IDs), and
//!   §2.3 (an ID is at most 2048 bytes, a trust domain at most 255 bytes).
//! - go-spiffe v2, `v2/spiffeid/id_test.go` (`TestFromString`: the loop over
//!   every byte value for trust domain and path characters, bad schemes,
//!   missing trust domain, empty and dot segments, percent-encoding;
//!   `TestFromPathf`, `TestIDReplacePath` for building an ID from a path),
//!   `v2/spiffeid/trustdomain_test.go` (`TestTrustDomainFromString`: bare
//!   names, names taken from an ID, the per-byte loop, bad IDs) and
//!   `v2/spiffeid/path_test.go` (`TestValidatePath`, `TestValidatePathSegment`).
//!   Older go-spiffe releases, which parsed with `net/url`, accepted some inputs
//!   the spec now forbids (`SPIFFE://`, `:`/`@`/sub-delims in paths, `//` in a
//!   path, uppercase trust domains folded to lowercase); those inputs appear
//!   below as *invalid* vectors, following the current spec.
//!
//! Each invalid vector names the exact [`IdError`] expected, including the
//! offending character and its byte offset where the error carries them. When
//! an input has several faults, the one reported is the first found scanning
//! left to right, trust domain before path, as go-spiffe does.

// A failed check in a test is a panic by design.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use oxid_pki::{IdError, SpiffeId, TrustDomain};

/// Characters allowed in a trust domain name (spec §2.1).
const TD_CHARS: &str = "abcdefghijklmnopqrstuvwxyz0123456789.-_";

/// Characters allowed in a path segment (spec §2.2).
const PATH_CHARS: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_";

/// Non-ASCII characters tried on top of U+0000..=U+00FF: multi-byte UTF-8,
/// and look-alikes of allowed characters that a careless case fold or
/// normalisation would turn into one (Kelvin sign → `k`, long s → `S`,
/// fullwidth `.` and `/`, division slash) or that are invisible.
const EXTRA_CHARS: [char; 11] = [
    'é',        // two bytes, also inside 0..=255 but kept as a named case
    '€',        // three bytes
    '🤯',       // four bytes, go-spiffe's percent-encoding example
    '\u{212A}', // KELVIN SIGN, lowercases to ASCII 'k'
    '\u{017F}', // LATIN SMALL LETTER LONG S, uppercases to ASCII 'S'
    '\u{0130}', // LATIN CAPITAL LETTER I WITH DOT ABOVE
    '\u{FF0E}', // FULLWIDTH FULL STOP
    '\u{FF0F}', // FULLWIDTH SOLIDUS
    '\u{2215}', // DIVISION SLASH
    '\u{200B}', // ZERO WIDTH SPACE
    '\u{FEFF}', // ZERO WIDTH NO-BREAK SPACE (BOM)
];

/// Every char for U+0000..=U+00FF (what go-spiffe's byte loop builds with
/// `string(rune(i))`), then [`EXTRA_CHARS`].
fn all_candidate_chars() -> impl Iterator<Item = char> {
    (0u8..=255).map(char::from).chain(EXTRA_CHARS)
}

fn parse(s: &str) -> Result<SpiffeId, IdError> {
    s.parse::<SpiffeId>()
}

/// `s` parses, prints back unchanged, splits into `td` and `path`, and the
/// same ID is produced by building it from its parts.
fn assert_valid_id(s: &str, td: &str, path: &str) {
    let id = match parse(s) {
        Ok(id) => id,
        Err(e) => panic!("{s:?} should be a valid SPIFFE ID, got {e:?}"),
    };
    assert_eq!(id.to_string(), s, "Display of {s:?}");
    assert_eq!(id.as_str(), s, "as_str of {s:?}");
    assert_eq!(id.trust_domain().as_str(), td, "trust domain of {s:?}");
    assert_eq!(id.path(), path, "path of {s:?}");
    assert_eq!(parse(id.as_ref()).as_ref(), Ok(&id), "re-parse of {s:?}");
    let built = TrustDomain::new(td).and_then(|t| t.spiffe_id(path));
    assert_eq!(built.as_ref(), Ok(&id), "building {s:?} from its parts");
}

fn assert_invalid_id(s: &str, expected: IdError) {
    assert_eq!(parse(s), Err(expected), "parsing {s:?}");
}

#[test]
fn valid_ids_round_trip_and_split() {
    // (ID, trust domain, path)
    let vectors: &[(&str, &str, &str)] = &[
        // go-spiffe TestFromString: the path is optional.
        ("spiffe://trustdomain", "trustdomain", ""),
        ("spiffe://trustdomain/path", "trustdomain", "/path"),
        (
            "spiffe://domain.test/path/element",
            "domain.test",
            "/path/element",
        ),
        // Spec §2.2 examples.
        (
            "spiffe://staging.example.com/payments/mysql",
            "staging.example.com",
            "/payments/mysql",
        ),
        (
            "spiffe://staging.example.com/payments/web-fe",
            "staging.example.com",
            "/payments/web-fe",
        ),
        (
            "spiffe://k8s-west.example.com/ns/staging/sa/default",
            "k8s-west.example.com",
            "/ns/staging/sa/default",
        ),
        (
            "spiffe://example.com/9eebccd2-12bf-40a6-b262-65fe0487d453",
            "example.com",
            "/9eebccd2-12bf-40a6-b262-65fe0487d453",
        ),
        // Spec §2.1.1: underscores are fine in a trust domain.
        (
            "spiffe://trust_domain_name.example.com",
            "trust_domain_name.example.com",
            "",
        ),
        // Spec §2.1: IPv4 dotted quads are not excluded.
        ("spiffe://192.168.2.2/path", "192.168.2.2", "/path"),
        // The charset has no label rules: any of [a-z0-9.-_] anywhere.
        ("spiffe://a", "a", ""),
        ("spiffe://0", "0", ""),
        ("spiffe://-._/x", "-._", "/x"),
        // go-spiffe: segments holding dots but not only one or two dots.
        ("spiffe://trustdomain/.path", "trustdomain", "/.path"),
        ("spiffe://trustdomain/..path", "trustdomain", "/..path"),
        ("spiffe://trustdomain/...", "trustdomain", "/..."),
        (
            "spiffe://trustdomain/path./x..",
            "trustdomain",
            "/path./x..",
        ),
        // go-spiffe path_test: mixed segment charset and a hierarchical path.
        ("spiffe://trustdomain/abc-_.Z9", "trustdomain", "/abc-_.Z9"),
        (
            "spiffe://trustdomain/ns/default/sa/web",
            "trustdomain",
            "/ns/default/sa/web",
        ),
        // Spec §2.4: the path is case-sensitive and keeps its case.
        (
            "spiffe://trustdomain/PATH1/Path2/path3",
            "trustdomain",
            "/PATH1/Path2/path3",
        ),
        (
            "spiffe://trustdomain/a/b/c/d/e/f/g/h",
            "trustdomain",
            "/a/b/c/d/e/f/g/h",
        ),
        // A path segment may look like a scheme or a host, as long as its
        // characters are allowed.
        (
            "spiffe://trustdomain/spiffe/example.org",
            "trustdomain",
            "/spiffe/example.org",
        ),
    ];
    for &(s, td, path) in vectors {
        assert_valid_id(s, td, path);
    }
}

#[test]
fn ids_with_a_different_path_case_are_different_ids() {
    // Spec §2.4: the path is case-sensitive.
    let lower = parse("spiffe://trustdomain/path").unwrap();
    let upper = parse("spiffe://trustdomain/PATH").unwrap();
    assert_ne!(lower, upper);
    assert_eq!(lower.trust_domain(), upper.trust_domain());
}

#[test]
fn invalid_scheme() {
    let vectors: &[(&str, IdError)] = &[
        ("", IdError::Empty),
        // go-spiffe TestFromString "reject bad scheme".
        ("s", IdError::WrongScheme),
        ("spiffe:/", IdError::WrongScheme),
        ("Spiffe://", IdError::WrongScheme),
        // Spec §2 requires the scheme `spiffe`. §2.4 calls the scheme
        // case-insensitive, but go-spiffe refuses any other spelling, and so
        // does oxid, so that one identity has one spelling.
        ("SPIFFE://domain.test/path/element", IdError::WrongScheme),
        ("Spiffe://trustdomain/path", IdError::WrongScheme),
        ("spiffE://trustdomain/path", IdError::WrongScheme),
        // Missing or broken `//`.
        ("spiffe", IdError::WrongScheme),
        ("spiffe:", IdError::WrongScheme),
        ("spiffe:path/element", IdError::WrongScheme),
        ("spiffe:/path/element", IdError::WrongScheme),
        ("spiffe:/trustdomain/path", IdError::WrongScheme),
        ("spiffe//trustdomain/path", IdError::WrongScheme),
        // Another scheme, or none at all.
        ("http://domain.test/path/element", IdError::WrongScheme),
        ("https://trustdomain/path", IdError::WrongScheme),
        ("spiffes://trustdomain/path", IdError::WrongScheme),
        ("://domain.test", IdError::WrongScheme),
        ("//trustdomain/path", IdError::WrongScheme),
        ("192.168.2.2:6688", IdError::WrongScheme),
        ("trustdomain", IdError::WrongScheme),
        ("trustdomain/path", IdError::WrongScheme),
        ("/path/element", IdError::WrongScheme),
        ("BAD", IdError::WrongScheme),
        // No trimming: surrounding whitespace is not part of a URI.
        (" spiffe://trustdomain/path", IdError::WrongScheme),
        ("\tspiffe://trustdomain/path", IdError::WrongScheme),
    ];
    for (s, expected) in vectors {
        assert_invalid_id(s, expected.clone());
    }
}

#[test]
fn invalid_trust_domain_in_id() {
    use IdError::BadTrustDomainChar as Bad;
    let vectors: &[(&str, IdError)] = &[
        // Spec §2: a non-zero trust domain name; go-spiffe "reject missing
        // trust domain".
        ("spiffe://", IdError::MissingTrustDomain),
        ("spiffe:///", IdError::MissingTrustDomain),
        ("spiffe:///path", IdError::MissingTrustDomain),
        ("spiffe:///path/element", IdError::MissingTrustDomain),
        // Spec §2.1: lowercase only.
        ("spiffe://Example.org/x", Bad { ch: 'E', pos: 0 }),
        ("spiffe://DomAin.TesT", Bad { ch: 'D', pos: 0 }),
        ("spiffe://domain.tesT/path", Bad { ch: 'T', pos: 10 }),
        // Spec §2.1: no port, and no `:` at all.
        (
            "spiffe://domain.test:8080/path/element",
            Bad { ch: ':', pos: 11 },
        ),
        ("spiffe://domain.test:80", Bad { ch: ':', pos: 11 }),
        ("spiffe://domain.test:", Bad { ch: ':', pos: 11 }),
        (
            "spiffe://domain.test:/path/element",
            Bad { ch: ':', pos: 11 },
        ),
        // Spec §2.1: no userinfo.
        (
            "spiffe://user:password@test.org/path/element",
            Bad { ch: ':', pos: 4 },
        ),
        ("spiffe://user@test.org/path", Bad { ch: '@', pos: 4 }),
        ("spiffe://@test.org", Bad { ch: '@', pos: 0 }),
        // Spec §2.1: no percent-encoding (go-spiffe: encoded unicode and ascii).
        ("spiffe://%F0%9F%A4%AF/path", Bad { ch: '%', pos: 0 }),
        ("spiffe://%62%61%64/path", Bad { ch: '%', pos: 0 }),
        ("spiffe://example%2eorg/x", Bad { ch: '%', pos: 7 }),
        // Spec §2: no query or fragment (here right after the authority).
        ("spiffe://domain.test?query=1", Bad { ch: '?', pos: 11 }),
        ("spiffe://domain.test#fragment", Bad { ch: '#', pos: 11 }),
        ("spiffe://domain.test?", Bad { ch: '?', pos: 11 }),
        // Spec §2.1: IPv6 literals are excluded.
        ("spiffe://[::1]/path", Bad { ch: '[', pos: 0 }),
        // go-spiffe TestFromURI: a sub-delim in the host.
        ("spiffe://trust$domain", Bad { ch: '$', pos: 5 }),
        ("spiffe://trust domain/x", Bad { ch: ' ', pos: 5 }),
        ("spiffe://example.org\\path", Bad { ch: '\\', pos: 11 }),
        // Raw non-ASCII; the position is a byte offset.
        ("spiffe://🤯/path", Bad { ch: '🤯', pos: 0 }),
        ("spiffe://exämple.org", Bad { ch: 'ä', pos: 2 }),
        (
            "spiffe://\u{212A}8s.example/x",
            Bad {
                ch: '\u{212A}',
                pos: 0,
            },
        ),
    ];
    for (s, expected) in vectors {
        assert_invalid_id(s, expected.clone());
    }
}

#[test]
fn invalid_path() {
    use IdError::BadPathChar as Bad;
    let vectors: &[(&str, IdError)] = &[
        // Spec §2.2: no trailing slash; go-spiffe "reject empty segments".
        ("spiffe://trustdomain/", IdError::TrailingSlash),
        ("spiffe://trustdomain/path/", IdError::TrailingSlash),
        ("spiffe://trustdomain/path/other/", IdError::TrailingSlash),
        // Spec §2.2: no empty segments.
        ("spiffe://trustdomain//", IdError::EmptySegment),
        ("spiffe://trustdomain//path", IdError::EmptySegment),
        ("spiffe://trustdomain/path//other", IdError::EmptySegment),
        ("spiffe://trustdomain/path///", IdError::EmptySegment),
        // Accepted by old go-spiffe ("path starts with double slash").
        ("spiffe://domain.test//path/element", IdError::EmptySegment),
        // Spec §2.2: no `.` or `..` segments; go-spiffe "reject dot segments".
        ("spiffe://trustdomain/.", IdError::DotSegment),
        ("spiffe://trustdomain/..", IdError::DotSegment),
        ("spiffe://trustdomain/./path", IdError::DotSegment),
        ("spiffe://trustdomain/../path", IdError::DotSegment),
        ("spiffe://trustdomain/path/./other", IdError::DotSegment),
        ("spiffe://trustdomain/path/../other", IdError::DotSegment),
        ("spiffe://trustdomain/path/.", IdError::DotSegment),
        ("spiffe://trustdomain/path/..", IdError::DotSegment),
        ("spiffe://trustdomain/./", IdError::DotSegment),
        // Spec §2: no query, no fragment (go-spiffe's old vectors, and
        // `?#` with an empty query).
        (
            "spiffe://domain.test/path/element?query=1",
            Bad { ch: '?', pos: 13 },
        ),
        (
            "spiffe://domain.test/path/element?#fragment-1",
            Bad { ch: '?', pos: 13 },
        ),
        (
            "spiffe://domain.test/path/element#fragment-1",
            Bad { ch: '#', pos: 13 },
        ),
        ("spiffe://domain.test/path?", Bad { ch: '?', pos: 5 }),
        ("spiffe://domain.test/path#", Bad { ch: '#', pos: 5 }),
        // Spec §2.2: no percent-encoding, valid or not (go-spiffe).
        ("spiffe://trustdomain/%F0%9F%A4%AF", Bad { ch: '%', pos: 1 }),
        ("spiffe://trustdomain/%62%61%64", Bad { ch: '%', pos: 1 }),
        ("spiffe://trustdomain/%61pi", Bad { ch: '%', pos: 1 }),
        (
            "spiffe://domain.test/path/elem%5uent",
            Bad { ch: '%', pos: 10 },
        ),
        (
            "spiffe://domain.test/path/element%5",
            Bad { ch: '%', pos: 13 },
        ),
        // Spec §2.2 charset; these were accepted by old go-spiffe (gen-delims
        // `:`, `@`, `[`, `]` and the sub-delims).
        (
            "spiffe://domain.test/pa:th/element:",
            Bad { ch: ':', pos: 3 },
        ),
        (
            "spiffe://domain.test/pa@th/element",
            Bad { ch: '@', pos: 3 },
        ),
        (
            "spiffe://domain.test/path/elem[ent",
            Bad { ch: '[', pos: 10 },
        ),
        (
            "spiffe://domain.test/path/elem]ent",
            Bad { ch: ']', pos: 10 },
        ),
        (
            "spiffe://domain.test/p!a$t&h'/(e)l*e+m,e;n=t",
            Bad { ch: '!', pos: 2 },
        ),
        ("spiffe://domain.test/pat&h'/x", Bad { ch: '&', pos: 4 }),
        ("spiffe://trustdomain/path$", Bad { ch: '$', pos: 5 }),
        ("spiffe://trustdomain/~user", Bad { ch: '~', pos: 1 }),
        // An ID inside the path (accepted by old go-spiffe).
        (
            "spiffe://domain.test/spiffe://domain.test/path/element",
            Bad { ch: ':', pos: 7 },
        ),
        // Whitespace, control characters, backslash, non-ASCII.
        ("spiffe://trustdomain/with space", Bad { ch: ' ', pos: 5 }),
        ("spiffe://trustdomain/tab\t", Bad { ch: '\t', pos: 4 }),
        ("spiffe://trustdomain/nul\0", Bad { ch: '\0', pos: 4 }),
        ("spiffe://trustdomain/line\n", Bad { ch: '\n', pos: 5 }),
        ("spiffe://trustdomain/a\\b", Bad { ch: '\\', pos: 2 }),
        ("spiffe://trustdomain/🤯", Bad { ch: '🤯', pos: 1 }),
        (
            "spiffe://trustdomain/ok/caf\u{e9}",
            Bad {
                ch: '\u{e9}',
                pos: 7,
            },
        ),
    ];
    for (s, expected) in vectors {
        assert_invalid_id(s, expected.clone());
    }
}

#[test]
fn first_fault_wins() {
    // Several faults: the trust domain is checked before the path, and the
    // path left to right (go-spiffe's order).
    let vectors: &[(&str, IdError)] = &[
        (
            "spiffe://Bad/./x",
            IdError::BadTrustDomainChar { ch: 'B', pos: 0 },
        ),
        (
            "spiffe://bad:1//",
            IdError::BadTrustDomainChar { ch: ':', pos: 3 },
        ),
        ("spiffe:///.", IdError::MissingTrustDomain),
        (
            "spiffe://trustdomain/a$/",
            IdError::BadPathChar { ch: '$', pos: 2 },
        ),
        (
            "spiffe://trustdomain/a$//",
            IdError::BadPathChar { ch: '$', pos: 2 },
        ),
        ("spiffe://trustdomain/./a$", IdError::DotSegment),
        ("spiffe://trustdomain//a$", IdError::EmptySegment),
        ("spiffe://trustdomain/a/../b?c", IdError::DotSegment),
        (
            "spiffe://trustdomain/a?b/..",
            IdError::BadPathChar { ch: '?', pos: 2 },
        ),
        (
            "spiffe://trustdomain/a/b?c/",
            IdError::BadPathChar { ch: '?', pos: 4 },
        ),
    ];
    for (s, expected) in vectors {
        assert_invalid_id(s, expected.clone());
    }
}

#[test]
fn every_char_in_the_trust_domain_of_an_id() {
    let mut accepted_last = 0;
    let mut accepted_first = 0;
    let mut tried = 0;
    for c in all_candidate_chars() {
        // `/` ends the trust domain; it is covered by the path tests.
        if c == '/' {
            continue;
        }
        tried += 1;
        let allowed = TD_CHARS.contains(c);

        // As the last character: go-spiffe's "trustdomain<c>" shape.
        let s = format!("spiffe://trustdomain{c}/path");
        if allowed {
            accepted_last += 1;
            assert_valid_id(&s, &format!("trustdomain{c}"), "/path");
        } else {
            assert_invalid_id(&s, IdError::BadTrustDomainChar { ch: c, pos: 11 });
        }

        // As the first character.
        let s = format!("spiffe://{c}trustdomain/path");
        if allowed {
            accepted_first += 1;
            assert_valid_id(&s, &format!("{c}trustdomain"), "/path");
        } else {
            assert_invalid_id(&s, IdError::BadTrustDomainChar { ch: c, pos: 0 });
        }
    }
    assert_eq!(tried, 255 + EXTRA_CHARS.len(), "every candidate was tried");
    assert_eq!(
        accepted_last,
        TD_CHARS.len(),
        "exactly the spec's set is accepted"
    );
    assert_eq!(
        accepted_first,
        TD_CHARS.len(),
        "exactly the spec's set is accepted"
    );
}

#[test]
fn every_char_in_the_path_of_an_id() {
    let mut accepted = 0;
    let mut tried = 0;
    for c in all_candidate_chars() {
        // `/` separates segments; the segment tests cover it.
        if c == '/' {
            continue;
        }
        tried += 1;
        let allowed = PATH_CHARS.contains(c);
        if allowed {
            accepted += 1;
        }

        // As the last character: go-spiffe's "path<c>" shape.
        let s = format!("spiffe://trustdomain/path{c}");
        if allowed {
            assert_valid_id(&s, "trustdomain", &format!("/path{c}"));
        } else {
            assert_invalid_id(&s, IdError::BadPathChar { ch: c, pos: 5 });
        }

        // First character of a second segment; the position counts from the
        // start of the path.
        let s = format!("spiffe://trustdomain/seg/{c}tail");
        if allowed {
            assert_valid_id(&s, "trustdomain", &format!("/seg/{c}tail"));
        } else {
            assert_invalid_id(&s, IdError::BadPathChar { ch: c, pos: 5 });
        }

        // Alone in a segment: `.` then makes a dot segment.
        let s = format!("spiffe://trustdomain/{c}");
        if c == '.' {
            assert_invalid_id(&s, IdError::DotSegment);
        } else if allowed {
            assert_valid_id(&s, "trustdomain", &format!("/{c}"));
        } else {
            assert_invalid_id(&s, IdError::BadPathChar { ch: c, pos: 1 });
        }
    }
    assert_eq!(tried, 255 + EXTRA_CHARS.len(), "every candidate was tried");
    assert_eq!(
        accepted,
        PATH_CHARS.len(),
        "exactly the spec's set is accepted"
    );
}

#[test]
fn every_char_in_a_bare_trust_domain() {
    // go-spiffe TestTrustDomainFromString: "trustdomain<c>" for every byte
    // value, bare and as an ID. Here `/` is included: in a bare name it is
    // just another bad character.
    let mut accepted = 0;
    for c in all_candidate_chars() {
        let name = format!("trustdomain{c}");
        let as_id = format!("spiffe://trustdomain{c}");
        if TD_CHARS.contains(c) {
            accepted += 1;
            let td = TrustDomain::new(&name).unwrap();
            assert_eq!(td.as_str(), name);
            assert_eq!(td.to_string(), name);
            assert_eq!(name.parse::<TrustDomain>().as_ref(), Ok(&td));
            assert_eq!(as_id.parse::<TrustDomain>().as_ref(), Ok(&td));
            assert_eq!(td.id().as_str(), as_id);
        } else {
            let expected = IdError::BadTrustDomainChar { ch: c, pos: 11 };
            assert_eq!(
                TrustDomain::new(&name),
                Err(expected.clone()),
                "new({name:?})"
            );
            assert_eq!(
                name.parse::<TrustDomain>(),
                Err(expected.clone()),
                "{name:?}"
            );
            let expected_from_id = if c == '/' {
                // "spiffe://trustdomain/" is an ID with a trailing slash.
                IdError::TrailingSlash
            } else {
                expected
            };
            assert_eq!(
                as_id.parse::<TrustDomain>(),
                Err(expected_from_id),
                "{as_id:?}"
            );
        }
    }
    assert_eq!(
        accepted,
        TD_CHARS.len(),
        "exactly the spec's set is accepted"
    );
}

#[test]
fn trust_domain_length_limit() {
    // Spec §2.3: a trust domain name is at most 255 bytes.
    let at_limit = "a".repeat(255);
    let over_limit = "a".repeat(256);
    let dotted_at_limit = format!("{}.example", "x".repeat(255 - ".example".len()));
    assert_eq!(dotted_at_limit.len(), 255);

    for name in [&at_limit, &dotted_at_limit] {
        let td = TrustDomain::new(name).unwrap();
        assert_eq!(td.as_str(), name);
        assert_eq!(name.parse::<TrustDomain>().as_ref(), Ok(&td));
        assert_valid_id(&format!("spiffe://{name}"), name, "");
        assert_valid_id(&format!("spiffe://{name}/workload"), name, "/workload");
    }

    let too_long = IdError::TrustDomainTooLong { len: 256 };
    assert_eq!(TrustDomain::new(&over_limit), Err(too_long.clone()));
    assert_eq!(over_limit.parse::<TrustDomain>(), Err(too_long.clone()));
    assert_invalid_id(&format!("spiffe://{over_limit}"), too_long.clone());
    assert_invalid_id(&format!("spiffe://{over_limit}/workload"), too_long.clone());
    assert_eq!(
        format!("spiffe://{over_limit}/x").parse::<TrustDomain>(),
        Err(too_long)
    );

    let much_too_long = "b".repeat(1000);
    assert_eq!(
        TrustDomain::new(&much_too_long),
        Err(IdError::TrustDomainTooLong { len: 1000 })
    );
}

/// `spiffe://example.org` followed by a path of `/aaa…` segments of about
/// 100 bytes each, `len` bytes in all (`len` > 21).
fn id_of_len(len: usize) -> String {
    let mut s = String::from("spiffe://example.org");
    while s.len() < len {
        s.push('/');
        let room = (len - s.len()).min(100);
        // Never leave a trailing slash: if only the slash fits, the segment
        // before it was already as long as it can be, so grow it instead.
        if room == 0 {
            s.pop();
            s.push('a');
        } else {
            s.push_str(&"a".repeat(room));
        }
    }
    assert_eq!(s.len(), len);
    s
}

#[test]
fn spiffe_id_length_limit() {
    // Spec §2.3: IDs up to 2048 bytes MUST be supported; longer ones are not
    // generated, and oxid refuses them.
    for len in [2047, 2048] {
        let s = id_of_len(len);
        let path = &s["spiffe://example.org".len()..];
        assert_valid_id(&s, "example.org", path);
    }
    assert_invalid_id(&id_of_len(2049), IdError::TooLong { len: 2049 });
    assert_invalid_id(&id_of_len(4096), IdError::TooLong { len: 4096 });

    // The longest trust domain plus a path filling the rest is still valid.
    let name = "t".repeat(255);
    let prefix = format!("spiffe://{name}");
    let path = format!("/{}", "p".repeat(2048 - prefix.len() - 1));
    let s = format!("{prefix}{path}");
    assert_eq!(s.len(), 2048);
    assert_valid_id(&s, &name, &path);
    let one_more = format!("{s}p");
    assert_invalid_id(&one_more, IdError::TooLong { len: 2049 });

    // Building from a trust domain and a path obeys the same bound.
    let td = TrustDomain::new("example.org").unwrap();
    let fits = id_of_len(2048);
    let fits_path = &fits["spiffe://example.org".len()..];
    assert_eq!(
        td.spiffe_id(fits_path).map(|id| id.to_string()),
        Ok(fits.clone())
    );
    let over = id_of_len(2049);
    let over_path = &over["spiffe://example.org".len()..];
    assert_eq!(td.spiffe_id(over_path), Err(IdError::TooLong { len: 2049 }));
}

#[test]
fn trust_domain_from_str_vectors() {
    // go-spiffe TestTrustDomainFromString and TestTrustDomainID: a bare name,
    // or any valid SPIFFE ID whose trust domain is taken.
    let valid: &[(&str, &str)] = &[
        ("trustdomain", "trustdomain"),
        ("spiffe://trustdomain", "trustdomain"),
        ("spiffe://trustdomain/path", "trustdomain"),
        ("domain.test", "domain.test"),
        ("spiffe://domain.test/path/element", "domain.test"),
        ("example.org", "example.org"),
        ("192.168.2.2", "192.168.2.2"),
        (
            "trust_domain_name.example.com",
            "trust_domain_name.example.com",
        ),
        (
            "abcdefghijklmnopqrstuvwxyz0123456789.-_",
            "abcdefghijklmnopqrstuvwxyz0123456789.-_",
        ),
    ];
    for &(input, name) in valid {
        let td = input.parse::<TrustDomain>();
        assert_eq!(td.as_ref().map(TrustDomain::as_str), Ok(name), "{input:?}");
        let td = td.unwrap();
        assert_eq!(td.to_string(), name);
        assert_eq!(td.id().as_str(), format!("spiffe://{name}"));
        assert_eq!(TrustDomain::new(name).as_ref(), Ok(&td));
    }

    let invalid: &[(&str, IdError)] = &[
        ("", IdError::MissingTrustDomain),
        // go-spiffe "reject bad ids": scheme, trust domain and path faults in
        // an ID are reported as for SpiffeId.
        ("spiffe:/trustdomain/path", IdError::WrongScheme),
        ("spiffe://", IdError::MissingTrustDomain),
        ("spiffe:///path", IdError::MissingTrustDomain),
        ("spiffe://trustdomain/", IdError::TrailingSlash),
        ("spiffe://trustdomain/path/", IdError::TrailingSlash),
        ("spiffe://trustdomain//path", IdError::EmptySegment),
        ("spiffe://trustdomain/../path", IdError::DotSegment),
        (
            "spiffe://%F0%9F%A4%AF/path",
            IdError::BadTrustDomainChar { ch: '%', pos: 0 },
        ),
        (
            "spiffe://trustdomain/%F0%9F%A4%AF",
            IdError::BadPathChar { ch: '%', pos: 1 },
        ),
        ("http://domain.test", IdError::WrongScheme),
        ("://domain.test", IdError::WrongScheme),
        ("SPIFFE://domain.test", IdError::WrongScheme),
        (
            "spiffe://domain.test:80",
            IdError::BadTrustDomainChar { ch: ':', pos: 11 },
        ),
        (
            "spiffe://domain.test:",
            IdError::BadTrustDomainChar { ch: ':', pos: 11 },
        ),
        // Accepted by old go-spiffe, which only looked at the host.
        (
            "spiffe://domain.test/spiffe://domain.test:80/path/element",
            IdError::BadPathChar { ch: ':', pos: 7 },
        ),
        // Uppercase is not folded (old go-spiffe lowercased it; the spec now
        // requires lowercase, and go-spiffe's unmarshaler refuses "BAD").
        (
            "DomAin.TesT",
            IdError::BadTrustDomainChar { ch: 'D', pos: 0 },
        ),
        ("BAD", IdError::BadTrustDomainChar { ch: 'B', pos: 0 }),
        (
            "spiffe://DomAin.TesT",
            IdError::BadTrustDomainChar { ch: 'D', pos: 0 },
        ),
        // Bare names with URI parts.
        (
            "user:pass@domain.test",
            IdError::BadTrustDomainChar { ch: ':', pos: 4 },
        ),
        (
            "domain.test:8080",
            IdError::BadTrustDomainChar { ch: ':', pos: 11 },
        ),
        (
            "/path/element",
            IdError::BadTrustDomainChar { ch: '/', pos: 0 },
        ),
        (
            "domain.test/path",
            IdError::BadTrustDomainChar { ch: '/', pos: 11 },
        ),
        (
            "trust$domain",
            IdError::BadTrustDomainChar { ch: '$', pos: 5 },
        ),
        ("%62ad", IdError::BadTrustDomainChar { ch: '%', pos: 0 }),
        (
            " trustdomain",
            IdError::BadTrustDomainChar { ch: ' ', pos: 0 },
        ),
    ];
    for (input, expected) in invalid {
        assert_eq!(
            input.parse::<TrustDomain>(),
            Err(expected.clone()),
            "{input:?}"
        );
    }
}

#[test]
fn trust_domain_new_takes_bare_names_only() {
    assert_eq!(TrustDomain::new(""), Err(IdError::MissingTrustDomain));
    // An ID is not a bare name: its `:` is the first bad character.
    assert_eq!(
        TrustDomain::new("spiffe://example.org"),
        Err(IdError::BadTrustDomainChar { ch: ':', pos: 6 })
    );
    assert_eq!(
        TrustDomain::new("spiffe://example.org/path"),
        Err(IdError::BadTrustDomainChar { ch: ':', pos: 6 })
    );
    assert_eq!(
        TrustDomain::new("Example.org"),
        Err(IdError::BadTrustDomainChar { ch: 'E', pos: 0 })
    );
    assert_eq!(
        TrustDomain::new("example.org").map(|td| td.to_string()),
        Ok(String::from("example.org"))
    );
}

#[test]
fn building_an_id_from_a_path() {
    // go-spiffe TestFromPathf, TestIDReplacePath and path_test's
    // TestValidatePath: a path given on its own is empty or starts with `/`.
    let td = TrustDomain::new("trustdomain").unwrap();

    let valid: &[(&str, &str)] = &[
        ("", "spiffe://trustdomain"),
        ("/foo", "spiffe://trustdomain/foo"),
        ("/path/element", "spiffe://trustdomain/path/element"),
        (
            "/ns/default/sa/web",
            "spiffe://trustdomain/ns/default/sa/web",
        ),
        ("/.path", "spiffe://trustdomain/.path"),
        ("/...", "spiffe://trustdomain/..."),
        ("/abc-_.Z9", "spiffe://trustdomain/abc-_.Z9"),
    ];
    for &(path, expected) in valid {
        let id = td.spiffe_id(path).unwrap();
        assert_eq!(id.as_str(), expected);
        assert_eq!(id.path(), path);
        assert_eq!(id.trust_domain(), &td);
        assert_eq!(
            parse(expected).as_ref(),
            Ok(&id),
            "parse and build agree on {path:?}"
        );
    }
    assert_eq!(td.spiffe_id("").as_ref(), Ok(&td.id()));

    let invalid: &[(&str, IdError)] = &[
        ("foo", IdError::NoLeadingSlash),
        ("path/element", IdError::NoLeadingSlash),
        (".", IdError::NoLeadingSlash),
        ("$", IdError::NoLeadingSlash),
        ("/", IdError::TrailingSlash),
        ("/foo/", IdError::TrailingSlash),
        ("//", IdError::EmptySegment),
        ("/foo//bar", IdError::EmptySegment),
        ("/.", IdError::DotSegment),
        ("/..", IdError::DotSegment),
        ("/foo/../bar", IdError::DotSegment),
        ("/$", IdError::BadPathChar { ch: '$', pos: 1 }),
        ("/%61pi", IdError::BadPathChar { ch: '%', pos: 1 }),
        ("/foo?x=1", IdError::BadPathChar { ch: '?', pos: 4 }),
        ("/foo#frag", IdError::BadPathChar { ch: '#', pos: 4 }),
    ];
    for (path, expected) in invalid {
        assert_eq!(
            td.spiffe_id(path),
            Err(expected.clone()),
            "spiffe_id({path:?})"
        );
    }
}

#[test]
fn trust_domain_id_is_the_same_from_any_spelling() {
    // go-spiffe TestTrustDomainID / TestTrustDomainIDString.
    let expected = parse("spiffe://trustdomain").unwrap();
    for s in [
        "trustdomain",
        "spiffe://trustdomain",
        "spiffe://trustdomain/path",
    ] {
        let td = s.parse::<TrustDomain>().unwrap();
        assert_eq!(td.id(), expected, "{s:?}");
        assert_eq!(td.id().to_string(), "spiffe://trustdomain", "{s:?}");
        assert_eq!(td.id().path(), "", "{s:?}");
    }
}
