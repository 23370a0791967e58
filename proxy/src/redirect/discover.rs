//! Finding a pod's network namespace without a CNI plugin: with `hostPID`,
//! the proxy sees every process of the node. A container's cgroup path
//! carries its pod's UID (`…/kubepods/burstable/pod<uid>/<container>` with
//! cgroupfs, `…kubepods-burstable-pod<uid_with_underscores>.slice/…` with
//! the systemd driver), so one scan of `/proc/*/cgroup` maps pod UIDs to a
//! process, whose `/proc/<pid>/ns/net` is the pod's namespace. Every
//! container of a pod (the pause container included) shares it.
//!
//! Limits: a pod whose processes have not started yet has no namespace to
//! find (it is retried on the next scan); a restarted pod sandbox gets a new
//! namespace, which the next scan finds (the enroller compares namespace
//! identities, not paths); without `hostPID` nothing is found.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Namespace files of the pods in `uids` that have a running process, by UID.
pub fn pod_netns(proc_root: &Path, uids: &HashSet<&str>) -> HashMap<String, PathBuf> {
    let mut found = HashMap::new();
    if uids.is_empty() {
        return found;
    }
    // Both spellings of each UID, as the two cgroup drivers write them.
    let needles: Vec<(String, String, &str)> = uids
        .iter()
        .map(|uid| {
            (
                format!("pod{uid}"),
                format!("pod{}", uid.replace('-', "_")),
                *uid,
            )
        })
        .collect();
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        // Processes come and go during the scan: unreadable ones are skipped.
        let Ok(cgroups) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        for (dashed, underscored, uid) in &needles {
            if !found.contains_key(*uid)
                && (cgroups.contains(dashed.as_str()) || cgroups.contains(underscored.as_str()))
            {
                found.insert((*uid).to_owned(), proc_root.join(pid).join("ns/net"));
            }
        }
        if found.len() == needles.len() {
            break;
        }
    }
    found
}

/// Identity of a namespace file: (device, inode) of the nsfs object behind
/// it, the same for every path that reaches the same namespace.
pub fn netns_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(dir: &Path, pid: u32, cgroup: &str) {
        let p = dir.join(pid.to_string());
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("cgroup"), cgroup).unwrap();
    }

    #[test]
    fn finds_pods_by_uid_in_both_cgroup_driver_spellings() {
        let dir = std::env::temp_dir().join(format!("nodeway-discover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        fake_proc(&dir, 10, "0::/kubepods/burstable/pod1234-ab/c0ffee\n");
        fake_proc(
            &dir,
            11,
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod5678_cd.slice/cri-containerd-1.scope\n",
        );
        fake_proc(&dir, 12, "0::/system.slice/sshd.service\n");
        std::fs::create_dir_all(dir.join("self")).unwrap();
        let uids: HashSet<&str> = ["1234-ab", "5678-cd", "9999-ee"].into_iter().collect();
        let found = pod_netns(&dir, &uids);
        assert_eq!(found.get("1234-ab"), Some(&dir.join("10/ns/net")));
        assert_eq!(found.get("5678-cd"), Some(&dir.join("11/ns/net")));
        assert_eq!(found.get("9999-ee"), None, "no process yet");
        assert_eq!(found.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_same_namespace_has_one_identity_through_any_path() {
        let own = netns_identity(Path::new("/proc/self/ns/net")).unwrap();
        let by_pid = netns_identity(&PathBuf::from(format!(
            "/proc/{}/ns/net",
            std::process::id()
        )));
        assert_eq!(Some(own), by_pid);
    }
}
