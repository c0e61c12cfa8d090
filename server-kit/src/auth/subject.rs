//! The subject common name of a client certificate, read with just enough
//! DER to walk to it: a verified certificate's identity is its CN, and a
//! full X.509 parser (and its ASN.1 stack) for one field is more code to
//! trust than these lines. rustls has checked the chain before this runs;
//! the walk still bounds every length and fails closed on anything it does
//! not expect (indefinite lengths, multi-byte tags, lengths past the end).

/// A DER element: its tag, its contents, and what follows it.
struct Element<'a> {
    tag: u8,
    contents: &'a [u8],
    rest: &'a [u8],
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OBJECT_IDENTIFIER: u8 = 0x06;
/// `[0] EXPLICIT Version`, present in every certificate but v1 ones.
const VERSION: u8 = 0xa0;
/// id-at-commonName, 2.5.4.3.
const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];

fn element(input: &[u8]) -> Option<Element<'_>> {
    let (&tag, input) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // High tag numbers appear nowhere on the way.
    }
    let (&first, mut input) = input.split_first()?;
    let len = match first {
        0..=0x7f => usize::from(first),
        0x81..=0x84 => {
            let (bytes, rest) = input.split_at_checked(usize::from(first & 0x7f))?;
            input = rest;
            bytes.iter().try_fold(0_usize, |len, &b| {
                len.checked_mul(256)?.checked_add(b.into())
            })?
        }
        _ => return None, // Indefinite (BER) or absurd lengths.
    };
    let (contents, rest) = input.split_at_checked(len)?;
    Some(Element {
        tag,
        contents,
        rest,
    })
}

/// The element at the start of `input`, which must have `tag`.
fn expect(input: &[u8], tag: u8) -> Option<Element<'_>> {
    element(input).filter(|e| e.tag == tag)
}

/// The first subject CN of a DER certificate, if it has one and it is text.
pub(super) fn common_name(der: &[u8]) -> Option<String> {
    let certificate = expect(der, SEQUENCE)?;
    let tbs = expect(certificate.contents, SEQUENCE)?;
    let mut fields = tbs.contents;
    if let Some(version) = expect(fields, VERSION) {
        fields = version.rest;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        fields = element(fields)?.rest;
    }
    let mut names = expect(fields, SEQUENCE)?.contents;
    while !names.is_empty() {
        let rdn = expect(names, SET)?;
        names = rdn.rest;
        let mut attributes = rdn.contents;
        while !attributes.is_empty() {
            let attribute = expect(attributes, SEQUENCE)?;
            attributes = attribute.rest;
            let oid = expect(attribute.contents, OBJECT_IDENTIFIER)?;
            if oid.contents == COMMON_NAME {
                return text(&element(oid.rest)?);
            }
        }
    }
    None
}

/// A directory string as text: UTF8String, PrintableString, IA5String or
/// BMPString (UTF-16).
fn text(value: &Element<'_>) -> Option<String> {
    match value.tag {
        0x0c | 0x13 | 0x16 => std::str::from_utf8(value.contents).ok().map(str::to_owned),
        0x1e => {
            let units: Vec<u16> = value
                .contents
                .chunks(2)
                .map(|pair| match pair {
                    [high, low] => Some(u16::from_be_bytes([*high, *low])),
                    _ => None,
                })
                .collect::<Option<_>>()?;
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair};

    use super::*;

    fn certificate(dn: DistinguishedName) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["node-1.example".to_owned()]).unwrap();
        params.distinguished_name = dn;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_the_subject_common_name() {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CountryName, "DE");
        dn.push(DnType::OrganizationName, "oak");
        dn.push(DnType::CommonName, "node-1");
        assert_eq!(common_name(&certificate(dn)).as_deref(), Some("node-1"));
    }

    #[test]
    fn reads_every_kind_of_text() {
        for (value, expected) in [
            (
                DnValue::PrintableString("printable".try_into().unwrap()),
                "printable",
            ),
            (DnValue::Utf8String("ütf-8".into()), "ütf-8"),
            (DnValue::BmpString("bmp-ß".try_into().unwrap()), "bmp-ß"),
        ] {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, value);
            assert_eq!(common_name(&certificate(dn)).as_deref(), Some(expected));
        }
    }

    #[test]
    fn no_common_name_is_none() {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "oak");
        assert_eq!(common_name(&certificate(dn)), None);
    }

    #[test]
    fn a_truncated_certificate_is_none() {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "node-1");
        let der = certificate(dn);
        for len in 0..der.len() {
            assert_eq!(common_name(&der[..len]), None, "cut at {len}");
        }
    }

    proptest! {
        #[test]
        fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = common_name(&bytes);
        }

        #[test]
        fn any_flipped_byte_never_panics(at in 0_usize..2048, value in any::<u8>()) {
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "node-1");
            let mut der = certificate(dn);
            let at = at % der.len();
            der[at] = value;
            let _ = common_name(&der);
        }
    }
}
