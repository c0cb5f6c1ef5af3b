//! What QEMU says about one block node: its size and its dirty bitmaps
//! (`query-named-block-nodes`, `flat: true`), every member's shape checked.

use super::error::DrainError;
use crate::qemu::qmp::Qmp;
use serde_json::{Value, json};

/// One dirty bitmap of a node, as `query-named-block-nodes` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Its name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Dirty bytes (whole blocks).
    pub count: u64,
    /// Enabled (recording writes).
    pub recording: bool,
    /// In use by an operation (an NBD export, a backup job).
    pub busy: bool,
    /// Stored in the image when QEMU closes it.
    pub persistent: bool,
    /// Loaded `in_use` from the image: QEMU allows only its removal.
    pub inconsistent: bool,
}

/// One block node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Virtual size in bytes (what the guest sees).
    pub size: u64,
    /// Its dirty bitmaps.
    pub bitmaps: Vec<BitmapInfo>,
}

impl NodeInfo {
    /// The bitmap called `name`.
    pub fn bitmap(&self, name: &str) -> Option<&BitmapInfo> {
        self.bitmaps.iter().find(|b| b.name == name)
    }
}

const DURING: &str = "query-named-block-nodes";

fn bad(detail: String) -> DrainError {
    DrainError::QemuMisbehaved {
        during: DURING,
        detail,
    }
}

fn get_u64(v: &Value, key: &str, what: &str) -> Result<u64, DrainError> {
    v.get(key).and_then(Value::as_u64).ok_or_else(|| {
        bad(format!(
            "{what}: `{key}` missing or not an unsigned integer"
        ))
    })
}

fn get_bool(v: &Value, key: &str, what: &str) -> Result<bool, DrainError> {
    v.get(key)
        .and_then(Value::as_bool)
        .ok_or_else(|| bad(format!("{what}: `{key}` missing or not a boolean")))
}

/// Parse one `BlockDirtyInfo`.
fn parse_bitmap(b: &Value, node: &str) -> Result<BitmapInfo, DrainError> {
    let name = b
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("a dirty bitmap of {node} has no string `name`")))?
        .to_string();
    let what = format!("bitmap {name:?} of {node}");
    Ok(BitmapInfo {
        granularity: get_u64(b, "granularity", &what)?,
        count: get_u64(b, "count", &what)?,
        recording: get_bool(b, "recording", &what)?,
        busy: get_bool(b, "busy", &what)?,
        persistent: get_bool(b, "persistent", &what)?,
        inconsistent: match b.get("inconsistent") {
            None => false,
            Some(v) => v
                .as_bool()
                .ok_or_else(|| bad(format!("{what}: `inconsistent` is not a boolean")))?,
        },
        name,
    })
}

/// Parse the reply of `query-named-block-nodes` for `node`; `Ok(None)` if it has no such node.
pub fn parse(reply: &Value, node: &str) -> Result<Option<NodeInfo>, DrainError> {
    let nodes = reply
        .as_array()
        .ok_or_else(|| bad(format!("the reply is not an array: {reply}")))?;
    let Some(n) = nodes
        .iter()
        .find(|n| n.get("node-name").and_then(Value::as_str) == Some(node))
    else {
        return Ok(None);
    };
    let size = n
        .get("image")
        .and_then(|i| i.get("virtual-size"))
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(format!("node {node} has no unsigned `image.virtual-size`")))?;
    let bitmaps = match n.get("dirty-bitmaps") {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|b| parse_bitmap(b, node))
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(bad(format!(
                "node {node}: `dirty-bitmaps` is not an array: {other}"
            )));
        }
    };
    Ok(Some(NodeInfo { size, bitmaps }))
}

/// Ask QEMU about `node`. A node QEMU does not have is [`DrainError::Misuse`].
pub async fn query(qmp: &Qmp, node: &str) -> Result<NodeInfo, DrainError> {
    let reply = qmp
        .execute(DURING, json!({"flat": true}))
        .await
        .map_err(|e| DrainError::qmp(DURING, e))?;
    parse(&reply, node)?
        .ok_or_else(|| DrainError::Misuse(format!("QEMU has no block node named {node:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let ok = json!([
            {"node-name": "file0", "image": {"virtual-size": 5}},
            {"node-name": "fmt0", "image": {"virtual-size": 1048576}, "dirty-bitmaps": [
                {"name": "a", "granularity": 65536, "count": 0, "recording": true,
                 "busy": false, "persistent": false},
                {"name": "b", "granularity": 4096, "count": 8192, "recording": false,
                 "busy": true, "persistent": true, "inconsistent": true, "extra": 1}
            ]}
        ]);
        let n = parse(&ok, "fmt0").unwrap().unwrap();
        assert_eq!(n.size, 1048576);
        assert_eq!(n.bitmaps.len(), 2);
        assert!(n.bitmap("b").unwrap().inconsistent);
        assert!(!n.bitmap("a").unwrap().inconsistent);
        assert_eq!(parse(&ok, "file0").unwrap().unwrap().bitmaps, vec![]);
        assert!(parse(&ok, "nope").unwrap().is_none());
        for bad in [
            json!({}),
            json!([{"node-name": "fmt0"}]),
            json!([{"node-name": "fmt0", "image": {"virtual-size": -1}}]),
            json!([{"node-name": "fmt0", "image": {"virtual-size": 1}, "dirty-bitmaps": {}}]),
            json!([{"node-name": "fmt0", "image": {"virtual-size": 1},
                    "dirty-bitmaps": [{"name": "a"}]}]),
            json!([{"node-name": "fmt0", "image": {"virtual-size": 1},
                    "dirty-bitmaps": [{"name": 3, "granularity": 1, "count": 0,
                    "recording": true, "busy": false, "persistent": false}]}]),
        ] {
            assert!(
                matches!(parse(&bad, "fmt0"), Err(DrainError::QemuMisbehaved { .. })),
                "{bad}"
            );
        }
    }
}
