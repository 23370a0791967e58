//! Namespaces, Nodes and Pods: workloads (named the way Istio names them),
//! their localities and whether their traffic is redirected.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use super::{Invalid, Seen};
use crate::config::{Objects, Problems};
use crate::state::{Labels, Locality, ObjectKey, Workload};

/// Pod label with Istio's locality override, `region.zone[.subzone]`.
const ISTIO_LOCALITY_LABEL: &str = "istio-locality";
const REGION_LABELS: [&str; 2] = [
    "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/region",
];
const ZONE_LABELS: [&str; 2] = [
    "topology.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/zone",
];
const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
/// Namespace label that turns traffic redirection on (`enabled`); a Pod can opt out with `disabled`.
const REDIRECT_LABEL: &str = "nodeway.io/redirect";
/// Pod annotation naming its network namespace file (file mode).
pub const NETNS_ANNOTATION: &str = "nodeway.io/netns";

/// Builds workloads, fills `pods_by_ip`, and returns the workloads by pod key.
pub(super) fn build_pods<'o>(
    objects: &'o Objects,
    nodes: &HashMap<String, &Node>,
    namespaces: &HashMap<String, Labels>,
    seen: &mut Seen<'o>,
    problems: &mut Problems,
    pods_by_ip: &mut HashMap<IpAddr, Arc<Workload>>,
) -> HashMap<ObjectKey, Arc<Workload>> {
    let mut pods = HashMap::new();
    let mut ip_owner: HashMap<IpAddr, String> = HashMap::new();
    for item in &objects.pods {
        let pod: &Pod = &item.object;
        let Some((mut cx, key)) = seen.open(problems, &item.origin, "Pod", &pod.metadata, true)
        else {
            continue;
        };
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let status = pod.status.as_ref();
        let mut ips = Vec::new();
        if let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .filter(|ip| !ip.is_empty())
        {
            ips.extend(cx.ip(ip, "status.podIP"));
        }
        for (i, pod_ip) in status
            .and_then(|s| s.pod_ips.as_deref())
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            if let Some(ip) = cx.ip(&pod_ip.ip, &format!("status.podIPs[{i}].ip"))
                && !ips.contains(&ip)
            {
                ips.push(ip);
            }
        }
        // A Pod with a bad IP is left out, after its other IPs are checked too.
        let invalid = cx.failed();
        let spec = pod.spec.as_ref();
        let node_name = spec.and_then(|s| s.node_name.clone());
        let node_labels = node_name
            .as_ref()
            .and_then(|n| nodes.get(n))
            .and_then(|n| n.metadata.labels.as_ref());
        let namespace_enabled = namespaces
            .get(&key.namespace)
            .and_then(|l| l.get(REDIRECT_LABEL))
            .is_some_and(|v| v == "enabled");
        let pod_disabled = labels.get(REDIRECT_LABEL).is_some_and(|v| v == "disabled");
        let workload = Arc::new(Workload {
            pod_name: key.name.clone(),
            namespace: key.namespace.clone(),
            workload_name: workload_name(
                &key.name,
                &labels,
                pod.metadata.owner_references.as_deref().unwrap_or_default(),
            ),
            locality: workload_locality(&labels, node_labels, None),
            labels,
            ips,
            node_name,
            redirect_enabled: namespace_enabled && !pod_disabled,
            uid: pod.metadata.uid.clone().filter(|u| !u.is_empty()),
            netns: pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(NETNS_ANNOTATION))
                .filter(|p| !p.is_empty())
                .map(std::path::PathBuf::from),
        });

        // Host-network pods share the node's IP and finished pods may have
        // handed their IP to a new pod: neither identifies a client.
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let finished = matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if !host_network && !finished {
            for ip in &workload.ips {
                if let Some(other) = ip_owner.get(ip) {
                    cx.error(
                        "status.podIP",
                        Invalid::PodIpInUse {
                            ip: *ip,
                            other: other.clone(),
                        },
                    );
                } else if !invalid {
                    ip_owner.insert(*ip, cx.name.clone());
                    pods_by_ip.insert(*ip, workload.clone());
                }
            }
        }
        if !invalid {
            pods.insert(key, workload);
        }
    }
    pods
}

/// Istio's workload name for a pod: the Deployment behind a ReplicaSet, the
/// CronJob behind a Job, else the controller's name, else the pod's name.
pub fn workload_name(pod_name: &str, labels: &Labels, owners: &[OwnerReference]) -> String {
    let Some(owner) = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())
    else {
        return pod_name.to_string();
    };
    match owner.kind.as_str() {
        "ReplicaSet" => {
            if let Some(hash) = labels.get("pod-template-hash")
                && let Some(deployment) = owner
                    .name
                    .strip_suffix(hash.as_str())
                    .and_then(|n| n.strip_suffix('-'))
                && !deployment.is_empty()
            {
                return deployment.to_string();
            }
        }
        "Job" => {
            // CronJobs name their Jobs `<cronjob>-<scheduled time in minutes>`.
            if let Some((cron_job, suffix)) = owner.name.rsplit_once('-')
                && (8..=10).contains(&suffix.len())
                && suffix.bytes().all(|b| b.is_ascii_digit())
                && !cron_job.is_empty()
            {
                return cron_job.to_string();
            }
        }
        _ => {}
    }
    owner.name.clone()
}

/// Locality of a pod or endpoint: the pod's `istio-locality` label wins; else
/// the region and subzone of its Node and the zone from the EndpointSlice or
/// the Node.
pub(super) fn workload_locality(
    pod_labels: &Labels,
    node_labels: Option<&Labels>,
    slice_zone: Option<&str>,
) -> Locality {
    if let Some(label) = pod_labels.get(ISTIO_LOCALITY_LABEL) {
        let mut parts = label
            .splitn(3, '.')
            .map(|p| Some(p.to_string()).filter(|p| !p.is_empty()));
        return Locality {
            region: parts.next().flatten(),
            zone: parts.next().flatten(),
            subzone: parts.next().flatten(),
        };
    }
    let node = node_labels.map(node_locality).unwrap_or_default();
    Locality {
        zone: slice_zone.map(str::to_string).or(node.zone),
        ..node
    }
}

pub(super) fn node_locality(labels: &Labels) -> Locality {
    let first_of = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).cloned();
    Locality {
        region: first_of(&REGION_LABELS),
        zone: first_of(&ZONE_LABELS),
        subzone: first_of(&[SUBZONE_LABEL]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(kind: &str, name: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            controller: Some(controller),
            ..Default::default()
        }
    }

    #[test]
    fn workload_names_follow_istio() {
        let hash = Labels::from([("pod-template-hash".to_string(), "7cd856754".to_string())]);
        let none = Labels::new();
        let rs = [owner("ReplicaSet", "foo-7cd856754", true)];
        assert_eq!(workload_name("foo-7cd856754-x1", &hash, &rs), "foo");
        assert_eq!(
            workload_name("foo-7cd856754-x1", &none, &rs),
            "foo-7cd856754"
        );
        let other_hash = Labels::from([("pod-template-hash".to_string(), "abc".to_string())]);
        assert_eq!(workload_name("p", &other_hash, &rs), "foo-7cd856754");
        assert_eq!(
            workload_name("db-0", &none, &[owner("StatefulSet", "db", true)]),
            "db"
        );
        assert_eq!(
            workload_name("job-1", &none, &[owner("Job", "backup-28000000", true)]),
            "backup"
        );
        assert_eq!(
            workload_name("job-1", &none, &[owner("Job", "migrate-v2", true)]),
            "migrate-v2"
        );
        assert_eq!(workload_name("lonely", &none, &[]), "lonely");
        // The controller reference wins over other owners.
        let owners = [
            owner("Other", "x", false),
            owner("DaemonSet", "agent", true),
        ];
        assert_eq!(workload_name("agent-abcde", &none, &owners), "agent");
    }

    #[test]
    fn locality_prefers_the_istio_label() {
        let node = Labels::from([
            ("topology.kubernetes.io/region".to_string(), "r".to_string()),
            ("topology.kubernetes.io/zone".to_string(), "z".to_string()),
            ("topology.istio.io/subzone".to_string(), "s".to_string()),
        ]);
        let pod = Labels::from([(
            "istio-locality".to_string(),
            "us-east.us-east-1a".to_string(),
        )]);
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            workload_locality(&pod, Some(&node), Some("slice-zone")),
            Locality {
                region: some("us-east"),
                zone: some("us-east-1a"),
                subzone: None
            }
        );
        assert_eq!(
            workload_locality(&Labels::new(), Some(&node), Some("slice-zone")),
            Locality {
                region: some("r"),
                zone: some("slice-zone"),
                subzone: some("s")
            }
        );
        assert_eq!(
            workload_locality(&Labels::new(), Some(&node), None),
            Locality {
                region: some("r"),
                zone: some("z"),
                subzone: some("s")
            }
        );
        assert_eq!(
            workload_locality(&Labels::new(), None, None),
            Locality::default()
        );
    }
}
