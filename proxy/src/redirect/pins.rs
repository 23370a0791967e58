//! The eBPF maps every Nodeway on a node shares, pinned under bpffs, so an
//! upgrade hands the data path over without a gap.
//!
//! Each process attaches its own programs (bpf_links, detached by the kernel
//! when it exits), but they all read and write the same pinned maps: a
//! connection redirected by the old process's `connect4` is found by the new
//! one, and the enrolment survives the old one's exit. Whether another
//! Nodeway is alive is read from the kernel: a loaded program that uses the
//! pinned enrolment map belongs to a live process (a dead one's programs are
//! freed with it). Pins nobody uses are left by a process that died; they
//! are removed before loading.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aya::maps::MapInfo;
use aya::programs::loaded_programs;

/// Maps shared across processes. Per-process ones (globals, the log ring) are not pinned.
pub const SHARED_MAPS: [&str; 5] = [
    "ENROLLED",
    "ORIG_BY_COOKIE",
    "ORIG_BY_TUPLE",
    "SOCKETS",
    "INBOUND_LISTENERS",
];

/// `statfs` magic of a bpf filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A map's shape: what must match for two versions to share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

/// The layouts of the shared maps in an eBPF object.
pub fn object_layouts(object: &[u8]) -> Result<HashMap<&'static str, Layout>, String> {
    let parsed = aya_obj::Object::parse(object).map_err(|e| e.to_string())?;
    let mut layouts = HashMap::new();
    for name in SHARED_MAPS {
        let map = parsed
            .maps
            .get(name)
            .ok_or_else(|| format!("map {name} is not in the object"))?;
        layouts.insert(
            name,
            Layout {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                max_entries: map.max_entries(),
            },
        );
    }
    Ok(layouts)
}

fn pinned_layout(path: &Path) -> Result<(u32, Layout), String> {
    let info = MapInfo::from_pin(path).map_err(|e| e.to_string())?;
    let map_type = info.map_type().map_err(|e| e.to_string())? as u32;
    Ok((
        info.id(),
        Layout {
            map_type,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        },
    ))
}

/// Whether a loaded program other than `own` uses map `map_id`: another
/// Nodeway process is alive and shares the pins.
pub fn used_by_another_process(map_id: u32, own: &[u32]) -> bool {
    loaded_programs()
        .filter_map(Result::ok)
        .filter(|program| !own.contains(&program.id()))
        .any(|program| {
            program
                .map_ids()
                .ok()
                .flatten()
                .is_some_and(|ids| ids.contains(&map_id))
        })
}

/// What was found under the pin directory before loading.
#[derive(Debug, PartialEq, Eq)]
pub enum PinState {
    /// No pins, or stale ones (removed): this process creates the maps.
    Fresh { removed_stale: bool },
    /// A live Nodeway's maps, with this version's layout: shared.
    Shared,
}

/// Why the pins cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{0} is not on a bpf filesystem")]
    NotBpffs(PathBuf),
    #[error("{path}: {detail}")]
    Io { path: PathBuf, detail: String },
    #[error(
        "map {name} pinned at {path} by a running Nodeway has {pinned}, this version needs {ours}: \
         the two versions cannot share the data path, so this one refuses to take over (the running one is untouched)"
    )]
    LayoutMismatch {
        name: &'static str,
        path: PathBuf,
        pinned: Layout,
        ours: Layout,
    },
}

/// Checks `dir` (created if missing) before loading: pins of a live process
/// must have this version's layouts; pins of a dead one are removed.
/// `in_use(map_id)` says whether a live process uses a map
/// ([`used_by_another_process`]).
pub fn prepare(
    dir: &Path,
    ours: &HashMap<&'static str, Layout>,
    in_use: impl Fn(u32) -> bool,
) -> Result<PinState, PinError> {
    let io = |path: &Path, e: std::io::Error| PinError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    if !is_bpffs(dir) {
        return Err(PinError::NotBpffs(dir.to_path_buf()));
    }
    let enrolled = dir.join("ENROLLED");
    let live = match pinned_layout(&enrolled) {
        Ok((id, _)) => in_use(id),
        Err(_) => false,
    };
    if live {
        for name in SHARED_MAPS {
            let path = dir.join(name);
            // A map missing from a live process's pins is created and pinned by the loader.
            let Ok((_, pinned)) = pinned_layout(&path) else {
                continue;
            };
            let ours = ours[name];
            if pinned != ours {
                return Err(PinError::LayoutMismatch {
                    name,
                    path,
                    pinned,
                    ours,
                });
            }
        }
        return Ok(PinState::Shared);
    }
    let removed_stale = remove(dir)?;
    Ok(PinState::Fresh { removed_stale })
}

/// Removes the shared maps' pins (the maps live on while a process uses
/// them); returns whether there were any.
pub fn remove(dir: &Path) -> Result<bool, PinError> {
    let mut removed = false;
    for name in SHARED_MAPS {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(PinError::Io {
                    path,
                    detail: e.to_string(),
                });
            }
        }
    }
    Ok(removed)
}

#[allow(unsafe_code)]
fn is_bpffs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid value for the kernel to overwrite.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` is a writable statfs.
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}
