//! Log uploads of `collect_logs` commands: `DATA/logs/<command id>`, appended in order.
//! Every function here blocks (file I/O); the worker calls them on a blocking thread.

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The file of a command's upload. Command ids are ours (32 hex digits) and checked before
/// they reach here; this refuses anything that is not a plain file name anyway.
pub(crate) fn path(dir: &Path, id: &str) -> Option<PathBuf> {
    let plain = !id.is_empty()
        && id.len() <= posfleet_proto::signing::MAX_COMMAND_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    plain.then(|| dir.join(id))
}

/// Writes `data` at `offset` of the upload file (creating it at offset 0) and, for the last
/// chunk, fsyncs it. The file must hold at least `offset` bytes; bytes beyond `offset`
/// (a chunk written before a crash whose record update was lost) are replaced.
pub(crate) fn write_chunk(
    file: &Path,
    offset: u64,
    data: &[u8],
    last: bool,
) -> std::io::Result<u64> {
    if let Some(dir) = file.parent() {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(file)?;
    let len = f.metadata()?.len();
    if len < offset {
        return Err(std::io::Error::other(format!(
            "the upload file holds {len} bytes, the chunk starts at {offset}"
        )));
    }
    f.set_len(offset)?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(data)?;
    if last {
        f.sync_all()?;
    }
    Ok(offset + data.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_append_and_a_rewrite_replaces_the_tail() {
        let tmp = tempfile::tempdir().unwrap();
        let file = path(&tmp.path().join("logs"), "abc").unwrap();
        assert_eq!(write_chunk(&file, 0, b"hello ", false).unwrap(), 6);
        assert_eq!(write_chunk(&file, 6, b"world", false).unwrap(), 11);
        assert_eq!(write_chunk(&file, 6, b"there", true).unwrap(), 11);
        assert_eq!(fs::read(&file).unwrap(), b"hello there");
        assert!(write_chunk(&file, 20, b"x", false).is_err());
        assert!(path(tmp.path(), "../etc").is_none());
        assert!(path(tmp.path(), "").is_none());
    }
}
