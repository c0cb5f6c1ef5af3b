//! Messages of the migration protocol (docs/protocol.md §2).
//!
//! postcard has no field tags: a message's layout is fixed forever once released. New messages
//! and new enum variants are only ever *appended*, and a peer only sends them after Hello/Welcome
//! negotiated a version or feature bit that announces them (docs/protocol.md §4). Every
//! variable-length field is bounded on decode ([`BoundedString`], [`BoundedVec`]); no message
//! holds a zero-sized item in a sequence.

use crate::chunk::ChunkKind;
use crate::disk::{Checkpoint, DiskId};
use crate::tree::{Cv, Root};
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::marker::PhantomData;

/// Protocol version 1, the only one so far (docs/protocol.md §4).
pub const PROTOCOL_V1: u16 = 1;
/// Versions this build speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[u16] = &[PROTOCOL_V1];
/// Most protocol versions a Hello may list.
pub const MAX_VERSIONS: usize = 16;
/// Longest host name in a Hello, in bytes.
pub const MAX_HOST: usize = 255;
/// Longest human-readable detail in a Refuse or Abort, in bytes.
pub const MAX_DETAIL: usize = 1024;
/// Longest checkpoint id, in bytes.
pub const MAX_CHECKPOINT_ID: usize = 255;

/// Feature bits negotiated in Hello/Welcome (docs/protocol.md §4). Unknown bits are ignored:
/// the Welcome carries the intersection.
pub mod features {
    /// The peer can run a post-copy switchover.
    pub const POSTCOPY: u64 = 1 << 0;
    /// Every feature this build knows.
    pub const ALL: u64 = POSTCOPY;
}

/// A string of at most `MAX` bytes; longer input is rejected while decoding, before it is
/// copied.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct BoundedString<const MAX: usize>(String);

impl<const MAX: usize> BoundedString<MAX> {
    /// Wrap `s`, cutting it at the last character boundary that fits (for locally written
    /// details, where losing the tail of a message beats failing).
    pub fn truncating(s: impl Into<String>) -> Self {
        let mut s = s.into();
        if s.len() > MAX {
            let mut cut = MAX;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
        }
        BoundedString(s)
    }

    /// Wrap `s` if it fits.
    pub fn new(s: impl Into<String>) -> Option<Self> {
        let s = s.into();
        (s.len() <= MAX).then_some(BoundedString(s))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const MAX: usize> fmt::Display for BoundedString<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<const MAX: usize> Serialize for BoundedString<MAX> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de, const MAX: usize> Deserialize<'de> for BoundedString<MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const MAX: usize>;
        impl<const MAX: usize> Visitor<'_> for V<MAX> {
            type Value = BoundedString<MAX>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a string of at most {MAX} bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if v.len() > MAX {
                    return Err(E::invalid_length(v.len(), &self));
                }
                Ok(BoundedString(v.to_owned()))
            }
        }
        d.deserialize_str(V::<MAX>)
    }
}

/// A sequence of at most `MAX` items; a longer declared length is rejected before anything is
/// allocated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct BoundedVec<T, const MAX: usize>(Vec<T>);

impl<T, const MAX: usize> BoundedVec<T, MAX> {
    /// Wrap `v` if it fits.
    pub fn new(v: Vec<T>) -> Option<Self> {
        (v.len() <= MAX).then_some(BoundedVec(v))
    }

    /// The items.
    pub fn as_slice(&self) -> &[T] {
        &self.0
    }
}

impl<T: Serialize, const MAX: usize> Serialize for BoundedVec<T, MAX> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>, const MAX: usize> Deserialize<'de> for BoundedVec<T, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const MAX: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for V<T, MAX> {
            type Value = BoundedVec<T, MAX>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a sequence of at most {MAX} items")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let hint = seq.size_hint().unwrap_or(0);
                if hint > MAX {
                    return Err(de::Error::invalid_length(hint, &self));
                }
                let mut v = Vec::with_capacity(hint);
                while let Some(item) = seq.next_element()? {
                    if v.len() == MAX {
                        return Err(de::Error::invalid_length(MAX + 1, &self));
                    }
                    v.push(item);
                }
                Ok(BoundedVec(v))
            }
        }
        d.deserialize_seq(V::<T, MAX>(PhantomData))
    }
}

/// Opening message of a connection, source → destination (docs/protocol.md §4). Its layout
/// must never change: it is how two builds of different ages find a common version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Every protocol version the sender speaks.
    pub protocol_versions: BoundedVec<u16, MAX_VERSIONS>,
    /// Feature bits the sender supports ([`features`]).
    pub features: u64,
    /// The sender's host name, for logs and the `--from` check (the TLS identity is what the
    /// agent trusts).
    pub host: BoundedString<MAX_HOST>,
}

/// The destination's answer to [`Hello`]: the chosen version and the common features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Highest version both sides speak.
    pub version: u16,
    /// Intersection of both sides' feature bits.
    pub features: u64,
}

/// Why a destination refuses a Hello or an Offer. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// No protocol version in common.
    UnsupportedVersion,
    /// The destination was not told to expect this disk (from this peer).
    NotExpected,
    /// The destination already owns this disk at the offered epoch or a newer one.
    StaleEpoch,
    /// The offer is malformed (geometry, chunk layout).
    BadOffer,
    /// Post-copy was asked for but is not allowed or not negotiated.
    PostcopyNotAllowed,
}

/// A refusal of a Hello or an Offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refuse {
    /// Machine-readable reason.
    pub reason: RefuseReason,
    /// Human-readable detail.
    pub detail: BoundedString<MAX_DETAIL>,
}

/// A checkpoint as it travels: the same fields as [`Checkpoint`], with the id bounded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireCheckpoint {
    /// The backup's id.
    pub id: BoundedString<MAX_CHECKPOINT_ID>,
    /// Root of that backup's block manifest, where known.
    pub manifest_root: Option<[u8; 32]>,
}

impl WireCheckpoint {
    /// Convert a checkpoint whose id fits the wire limit.
    pub fn from_checkpoint(c: &Checkpoint) -> Option<Self> {
        Some(WireCheckpoint {
            id: BoundedString::new(c.id.clone())?,
            manifest_root: c.manifest_root,
        })
    }

    /// Back to the store's type.
    pub fn to_checkpoint(&self) -> Checkpoint {
        Checkpoint {
            id: self.id.as_str().to_owned(),
            manifest_root: self.manifest_root,
        }
    }
}

/// How the source intends to switch over. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// The VM stays on the source until the destination holds the final bitmap.
    Precopy,
    /// The source may switch over before everything is sent; the destination then resumes at
    /// once and reports `incomplete` until it has verified the rest (docs/protocol.md §5.5).
    Postcopy,
}

/// The source's proposal: which disk, its layout and the source's ownership epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The disk.
    pub disk: DiskId,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Bytes per block.
    pub granularity: u64,
    /// What the bitmap counts from.
    pub checkpoint: Option<WireCheckpoint>,
    /// The source's current ownership epoch; the destination will own at `epoch + 1`.
    pub epoch: u64,
    /// Raw bitmap bytes per chunk; must equal [`crate::CHUNK_BYTES`].
    pub chunk_bytes: u32,
    /// Number of chunks; must match the geometry.
    pub chunks: u32,
    /// Root of the source bitmap when the offer was made (informational; the binding roots are
    /// the round roots and the final root).
    pub root: Root,
    /// Post-copy allowed or not.
    pub mode: Mode,
}

/// Header of one chunk of raw bitmap bytes; `payload_len` raw bytes follow the frame
/// (docs/protocol.md §3). The chunk *replaces* the destination's copy of that chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHeader {
    /// Round the chunk belongs to.
    pub round: u32,
    /// Chunk index.
    pub index: u32,
    /// Payload encoding.
    pub kind: ChunkKind,
    /// Chaining value of the chunk's raw bytes at its position ([`crate::tree::chunk_cv`]).
    pub cv: Cv,
    /// Bytes of payload that follow.
    pub payload_len: u32,
}

/// How a [`DeltaHeader`]'s payload lists block indices. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeltaEncoding {
    /// Roaring portable serialization of `block - base` (u32).
    Roaring,
    /// LEB128 varints: the first is `block - base`, each next one the gap (≥ 1) to the previous
    /// block.
    VarintGaps,
}

/// Header of a delta: blocks newly set since the previous round, relative to `base`;
/// `payload_len` raw bytes follow the frame. Deltas are OR-ed into the destination's copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaHeader {
    /// Round the delta belongs to.
    pub round: u32,
    /// Block index the payload's positions are relative to.
    pub base: u64,
    /// Payload encoding.
    pub encoding: DeltaEncoding,
    /// Bytes of payload that follow.
    pub payload_len: u32,
}

/// Switchover: the VM is paused (pre-copy) or already moving (post-copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switchover {
    /// The epoch the destination owns at from now on: offered epoch + 1.
    pub epoch_next: u64,
    /// Root of the source's final bitmap.
    pub final_root: Root,
    /// Post-copy: the destination resumes now and receives the rest afterwards.
    pub postcopy: bool,
}

/// Why a session was aborted. Append-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortReason {
    /// The operator (or orchestrator) asked for it.
    Requested,
    /// The peer sent something the protocol does not allow here, or a malformed frame.
    Protocol,
    /// A chunk did not decode or did not match its hash.
    BadChunk,
    /// A delta did not decode or pointed outside the bitmap.
    BadDelta,
    /// The roots of the two sides differ.
    RootMismatch,
    /// The switchover epoch is not the offered epoch + 1.
    StaleEpoch,
    /// A local failure (e.g. the store could not commit).
    Internal,
}

/// Abort the session. Whoever owned the disk before keeps owning it, except that a destination
/// that already took ownership says so (docs/protocol.md §6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    /// Machine-readable reason.
    pub reason: AbortReason,
    /// Human-readable detail.
    pub detail: BoundedString<MAX_DETAIL>,
    /// Set by a destination that has taken ownership (epoch + 1); always false from a source.
    pub dest_owns: bool,
}

/// Every message of the protocol. Append-only: new variants go at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// S→D: versions and features.
    Hello(Hello),
    /// D→S: chosen version and features.
    Welcome(Welcome),
    /// D→S: refusal of a Hello or an Offer.
    Refuse(Refuse),
    /// S→D: the disk and its layout.
    Offer(Offer),
    /// D→S: the offer is accepted; bulk may start. Carries the BLAKE3 of the Offer as the
    /// destination decoded it, so metadata the chunk hashes do not cover (disk, size, checkpoint,
    /// epoch) is verified too (docs/protocol.md §7).
    Accept {
        /// [`offer_hash`] of the Offer the destination accepted.
        offer: [u8; 32],
    },
    /// S→D: a chunk header; raw payload follows.
    Chunk(ChunkHeader),
    /// S→D: a delta header; raw payload follows.
    Delta(DeltaHeader),
    /// S→D: the round is complete; the source's bitmap has this root.
    RoundEnd {
        /// Round number.
        round: u32,
        /// Root the destination must now hold.
        root: Root,
    },
    /// D→S: the destination's copy has the same root.
    RoundAck {
        /// Round number.
        round: u32,
        /// Root the destination computed.
        root: Root,
    },
    /// S→D: switch over.
    Switchover(Switchover),
    /// D→S: the destination committed the final bitmap durably and owns the disk.
    Committed {
        /// The destination's new epoch.
        epoch: u64,
        /// The source's final root, as verified.
        root: Root,
    },
    /// S→D: the source retired its copy.
    Retired,
    /// Either way: abort.
    Abort(Abort),
}

/// Number of [`Message`] variants this build knows; a larger tag is a newer peer's message.
pub const MESSAGE_KINDS: u32 = 13;

impl Message {
    /// Short name for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome(_) => "Welcome",
            Message::Refuse(_) => "Refuse",
            Message::Offer(_) => "Offer",
            Message::Accept { .. } => "Accept",
            Message::Chunk(_) => "Chunk",
            Message::Delta(_) => "Delta",
            Message::RoundEnd { .. } => "RoundEnd",
            Message::RoundAck { .. } => "RoundAck",
            Message::Switchover(_) => "Switchover",
            Message::Committed { .. } => "Committed",
            Message::Retired => "Retired",
            Message::Abort(_) => "Abort",
        }
    }

    /// Bytes of raw payload that follow this message's frame on the stream (docs/protocol.md §3).
    pub fn payload_len(&self) -> usize {
        match self {
            Message::Chunk(h) => h.payload_len as usize,
            Message::Delta(h) => h.payload_len as usize,
            _ => 0,
        }
    }
}

/// BLAKE3 of an Offer's postcard encoding: what `Accept` echoes.
pub fn offer_hash(o: &Offer) -> [u8; 32] {
    *blake3::hash(&postcard::to_stdvec(o).expect("offers serialize")).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tags are wire format: this pins every variant's position (append-only, §4) and that each
    /// message survives a round trip through the frame codec.
    #[test]
    fn tags_are_frozen_and_every_message_round_trips() {
        let root = Root([7; 32]);
        let detail = BoundedString::new("why").unwrap();
        let all = vec![
            Message::Hello(Hello {
                protocol_versions: BoundedVec::new(vec![1]).unwrap(),
                features: features::ALL,
                host: BoundedString::new("h").unwrap(),
            }),
            Message::Welcome(Welcome {
                version: 1,
                features: 1,
            }),
            Message::Refuse(Refuse {
                reason: RefuseReason::PostcopyNotAllowed,
                detail: detail.clone(),
            }),
            Message::Offer(Offer {
                disk: DiskId::new("vm/vda").unwrap(),
                size: 1 << 40,
                granularity: 65536,
                checkpoint: Some(WireCheckpoint {
                    id: BoundedString::new("c").unwrap(),
                    manifest_root: Some([1; 32]),
                }),
                epoch: 3,
                chunk_bytes: 65536,
                chunks: 32,
                root,
                mode: Mode::Postcopy,
            }),
            Message::Accept { offer: [7; 32] },
            Message::Chunk(ChunkHeader {
                round: 0,
                index: 5,
                kind: ChunkKind::Roaring,
                cv: [9; 32],
                payload_len: 77,
            }),
            Message::Delta(DeltaHeader {
                round: 2,
                base: 1 << 33,
                encoding: DeltaEncoding::VarintGaps,
                payload_len: 5,
            }),
            Message::RoundEnd { round: 1, root },
            Message::RoundAck { round: 1, root },
            Message::Switchover(Switchover {
                epoch_next: 4,
                final_root: root,
                postcopy: true,
            }),
            Message::Committed { epoch: 4, root },
            Message::Retired,
            Message::Abort(Abort {
                reason: AbortReason::Internal,
                detail,
                dest_owns: true,
            }),
        ];
        assert_eq!(all.len(), MESSAGE_KINDS as usize);
        for (tag, m) in all.iter().enumerate() {
            let f = crate::proto::frame::encode(m).unwrap();
            assert_eq!(f[4] as usize, tag, "{} moved", m.name());
            let back = crate::proto::frame::decode_body(&f[4..]).unwrap();
            assert_eq!(&back, m);
        }
        // Hello's layout is frozen forever (§4): versions, features, host.
        assert_eq!(
            crate::proto::frame::encode(&all[0]).unwrap(),
            vec![6, 0, 0, 0, 0, 1, 1, 1, 1, b'h']
        );
    }

    #[test]
    fn bounded_string_rejects_long_input() {
        let ok = postcard::to_stdvec(&"a".repeat(MAX_HOST)).unwrap();
        assert!(postcard::from_bytes::<BoundedString<MAX_HOST>>(&ok).is_ok());
        let long = postcard::to_stdvec(&"a".repeat(MAX_HOST + 1)).unwrap();
        assert!(postcard::from_bytes::<BoundedString<MAX_HOST>>(&long).is_err());
        let t = BoundedString::<4>::truncating("aé€");
        assert_eq!(t.as_str(), "aé");
    }

    #[test]
    fn bounded_vec_rejects_huge_declared_length() {
        // A varint length of 2^32-1 followed by nothing: must fail without allocating.
        let bytes = [0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(postcard::from_bytes::<BoundedVec<u16, MAX_VERSIONS>>(&bytes).is_err());
        let v = postcard::to_stdvec(&vec![1u16; MAX_VERSIONS + 1]).unwrap();
        assert!(postcard::from_bytes::<BoundedVec<u16, MAX_VERSIONS>>(&v).is_err());
        let v = postcard::to_stdvec(&vec![1u16; MAX_VERSIONS]).unwrap();
        assert_eq!(
            postcard::from_bytes::<BoundedVec<u16, MAX_VERSIONS>>(&v)
                .unwrap()
                .as_slice()
                .len(),
            MAX_VERSIONS
        );
    }
}
