//! Fuzzes receive-side validation: bytes from another process are untrusted,
//! so `Message::validate` (and `OwnedMessage::new`, which must agree with it)
//! must reject anything that is not a valid archive, and whatever they accept
//! must deserialize without panicking.
//!
//! The input is the payload exactly as a receiver would hand it over: copied
//! to a 16-byte-aligned buffer.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringipc::rkyv::{self, Archive, Deserialize, Serialize, rancor, util::AlignedVec};
use ringipc::{Message, OwnedMessage};

/// A message type with the shapes that make validation interesting: strings
/// (UTF-8), vectors (length and bounds), an optional box (a relative pointer
/// that may be null), recursion, and an enum (its tag).
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
#[rkyv(
    crate = ringipc::rkyv,
    // `child` is recursive, so the derive cannot add bounds for it; these are
    // the bounds that `Box`, `Vec` and `String` need.
    serialize_bounds(
        __S: rkyv::ser::Writer + rkyv::ser::Allocator,
        __S::Error: rkyv::rancor::Source,
    ),
    deserialize_bounds(__D::Error: rkyv::rancor::Source),
    bytecheck(bounds(
        __C: rkyv::validation::ArchiveContext,
        __C::Error: rkyv::rancor::Source,
    )),
)]
struct Node {
    name: String,
    values: Vec<u64>,
    shape: Shape,
    #[rkyv(omit_bounds)]
    child: Option<Box<Node>>,
}

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
#[rkyv(crate = ringipc::rkyv)]
enum Shape {
    Empty,
    Point { x: i32, y: i32 },
    Label(String),
    Tags(Vec<Option<u16>>),
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = AlignedVec::<16>::new();
    bytes.extend_from_slice(data);
    let checked = Message::<Node>::validate(&bytes);
    let owned = OwnedMessage::<Node>::new(bytes.clone());
    assert_eq!(
        checked.is_ok(),
        owned.is_ok(),
        "Message and OwnedMessage disagree"
    );
    let (Ok(msg), Ok(owned)) = (checked, owned) else {
        return;
    };
    // Reading through the archive must not panic either.
    let _ = (
        msg.name.len(),
        msg.values.iter().count(),
        msg.child.is_some(),
    );
    let value = msg
        .deserialize()
        .expect("a validated archive must deserialize");
    assert_eq!(owned.deserialize().expect("owned deserialize"), value);

    // Whatever was accepted is a real `Node`: it survives another round trip.
    let again = rkyv::to_bytes::<rancor::Error>(&value).expect("serialize");
    let msg = Message::<Node>::validate(&again).expect("re-encoded archive must validate");
    assert_eq!(msg.deserialize().expect("deserialize"), value);
});
