//! Locality-aware grouping of a cluster's hosts, computed once per
//! configuration generation the way Istio computes EDS priorities and
//! locality weights (`pilot/pkg/networking/core/loadbalancer`).

use std::collections::BTreeMap;

use super::{BalancerConfig, Host};
use crate::state::{Labels, Locality, LocalityLbSetting};

/// How the hosts are split into groups.
#[derive(Debug, PartialEq, Eq)]
pub enum Grouping {
    /// Group `p` is priority `p` (0 = best), dense; one group when locality
    /// load balancing does not apply.
    Priorities { group_of: Vec<u32>, count: usize },
    /// `distribute`: one priority; groups are localities chosen by weight
    /// (weight 0: never chosen).
    Weighted {
        group_of: Vec<u32>,
        weights: Vec<u32>,
    },
}

pub fn group<H: Host>(hosts: &[H], config: &BalancerConfig<'_>) -> Grouping {
    let single = || Grouping::Priorities {
        group_of: vec![0; hosts.len()],
        count: usize::from(!hosts.is_empty()),
    };
    let setting = config.locality_setting;
    // `enabled: false` turns off everything (Istio's GetLocalityLbSetting);
    // unset (or no setting: the mesh default) is enabled.
    if setting.and_then(|s| s.enabled) == Some(false) {
        return single();
    }
    let empty = Locality::default();
    let client = config.client_locality.unwrap_or(&empty);
    if let Some(s) = setting.filter(|s| !s.distribute.is_empty()) {
        // Istio applies `distribute` whether or not outlier detection is on,
        // and then never failover.
        return distribute(hosts, client, s).unwrap_or_else(single);
    }
    // Failover needs outlier detection, otherwise Envoy would never leave P0.
    if !config.outlier_detection_enabled {
        return single();
    }
    let failover: &[(String, String)] = setting.map_or(&[], |s| &s.failover);
    let keys: Vec<u32> = match setting.filter(|s| !s.failover_priority.is_empty()) {
        Some(s) => {
            let rules = PriorityLabels::new(&s.failover_priority, config.client_labels, client);
            hosts
                .iter()
                .map(|h| {
                    let p = rules.priority(h.labels(), h.locality());
                    // Istio: with `failover` also set, locality priorities
                    // refine each label priority (`p * 5 + locality`).
                    match config.client_locality {
                        Some(c) if !s.failover.is_empty() => {
                            p * 5 + locality_priority(c, h.locality(), failover)
                        }
                        _ => p,
                    }
                })
                .collect()
        }
        None => match config.client_locality {
            Some(c) => hosts
                .iter()
                .map(|h| locality_priority(c, h.locality(), failover))
                .collect(),
            None => return single(),
        },
    };
    let (group_of, count) = densify(&keys);
    Grouping::Priorities { group_of, count }
}

fn level(v: &Option<String>) -> &str {
    v.as_deref().unwrap_or("")
}

/// Istio's `LbPriority` plus `failover`: 0 same subzone, 1 same zone, 2 same
/// region, 3 other region (or, when a `failover` entry's `from` is the
/// client's region: 3 for its `to` region, 4 for the rest).
pub fn locality_priority(
    client: &Locality,
    endpoint: &Locality,
    failover: &[(String, String)],
) -> u32 {
    if level(&client.region) == level(&endpoint.region) {
        if level(&client.zone) == level(&endpoint.zone) {
            if level(&client.subzone) == level(&endpoint.subzone) {
                return 0;
            }
            return 1;
        }
        return 2;
    }
    match failover
        .iter()
        .find(|(from, _)| from == level(&client.region))
    {
        Some((_, to)) if to != level(&endpoint.region) => 4,
        _ => 3,
    }
}

/// Renumbers keys densely by rank (0 = smallest key).
fn densify(keys: &[u32]) -> (Vec<u32>, usize) {
    let mut distinct = keys.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let rank = |k: &u32| distinct.binary_search(k).unwrap_or(0) as u32;
    (keys.iter().map(rank).collect(), distinct.len())
}

const REGION: &str = "topology.kubernetes.io/region";
const ZONE: &str = "topology.kubernetes.io/zone";
const SUBZONE: &str = "topology.istio.io/subzone";

/// `failoverPriority`: label keys, optionally `key=value` (the value then
/// replaces the client's own). An endpoint's priority is `N - m` where `m` is
/// the number of leading keys whose values equal the client's (`0` when all
/// `N` match). Locality keys read the locality, not pod labels; a key absent
/// on both sides counts as equal (Go's zero value semantics in Istio).
struct PriorityLabels<'a> {
    /// (key, the client's value)
    keys: Vec<(&'a str, &'a str)>,
}

impl<'a> PriorityLabels<'a> {
    fn new(spec: &'a [String], client_labels: Option<&'a Labels>, client: &'a Locality) -> Self {
        let keys = spec
            .iter()
            .map(|s| match s.split_once('=') {
                Some((k, v)) => (k, v),
                None => (s.as_str(), label_value(s, client_labels, client)),
            })
            .collect();
        PriorityLabels { keys }
    }

    fn priority(&self, labels: Option<&Labels>, locality: &Locality) -> u32 {
        let n = self.keys.len();
        let matching = self
            .keys
            .iter()
            .take_while(|(k, v)| label_value(k, labels, locality) == *v)
            .count();
        (n - matching) as u32
    }
}

/// A `failoverPriority` key's value for a pod: locality keys from the
/// locality (falling back to the label), others from the pod labels.
fn label_value<'a>(key: &str, labels: Option<&'a Labels>, locality: &'a Locality) -> &'a str {
    let from_locality = match key {
        REGION => locality.region.as_deref(),
        ZONE => locality.zone.as_deref(),
        SUBZONE => locality.subzone.as_deref(),
        _ => None,
    };
    from_locality
        .or_else(|| labels.and_then(|l| l.get(key)).map(String::as_str))
        .unwrap_or("")
}

/// Istio's `LocalityMatch`: `region/zone/subzone` where `*` (and, for zone and
/// subzone, an omitted level) matches anything.
pub fn locality_match(locality: &Locality, pattern: &str) -> bool {
    let mut parts = pattern.splitn(3, '/');
    let (region, zone, subzone) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let eq = |rule: &str, v: &Option<String>| rule == "*" || rule == level(v);
    eq(region, &locality.region)
        && (zone.is_empty() || eq(zone, &locality.zone))
        && (subzone.is_empty() || eq(subzone, &locality.subzone))
}

/// Istio's `applyLocalityWeights`: the first rule whose `from` matches the
/// client applies. Each `to` pattern (in order) claims the localities it
/// matches that no earlier pattern claimed and shares its weight among them
/// in proportion to their endpoint counts (rounded up). Unclaimed localities
/// get weight 0 (Istio removes their endpoints). No matching rule: `None`
/// (plain balancing, no failover — as in Istio).
fn distribute<H: Host>(
    hosts: &[H],
    client: &Locality,
    setting: &LocalityLbSetting,
) -> Option<Grouping> {
    let (_, to) = setting
        .distribute
        .iter()
        .find(|(from, _)| locality_match(client, from))?;
    // Localities in order of first appearance.
    let mut index: BTreeMap<(&str, &str, &str), u32> = BTreeMap::new();
    let mut localities: Vec<(&Locality, u64)> = Vec::new();
    let group_of: Vec<u32> = hosts
        .iter()
        .map(|h| {
            let l = h.locality();
            let key = (level(&l.region), level(&l.zone), level(&l.subzone));
            let g = *index.entry(key).or_insert_with(|| {
                localities.push((l, 0));
                (localities.len() - 1) as u32
            });
            localities[g as usize].1 += 1;
            g
        })
        .collect();
    let mut weights = vec![0u32; localities.len()];
    let mut claimed = vec![false; localities.len()];
    for (pattern, weight) in to {
        let matched: Vec<usize> = (0..localities.len())
            .filter(|&g| !claimed[g] && locality_match(localities[g].0, pattern))
            .collect();
        let total: u64 = matched.iter().map(|&g| localities[g].1).sum();
        for g in matched {
            claimed[g] = true;
            let w = (localities[g].1 * u64::from(*weight)).div_ceil(total);
            weights[g] = u32::try_from(w).unwrap_or(u32::MAX);
        }
    }
    Some(Grouping::Weighted { group_of, weights })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(s: &str) -> Locality {
        let mut p = s.split('/').map(|x| (!x.is_empty()).then(|| x.to_string()));
        Locality {
            region: p.next().flatten(),
            zone: p.next().flatten(),
            subzone: p.next().flatten(),
        }
    }

    #[test]
    fn default_priorities() {
        let c = loc("r1/z1/s1");
        assert_eq!(locality_priority(&c, &loc("r1/z1/s1"), &[]), 0);
        assert_eq!(locality_priority(&c, &loc("r1/z1/s2"), &[]), 1);
        assert_eq!(locality_priority(&c, &loc("r1/z1"), &[]), 1);
        assert_eq!(locality_priority(&c, &loc("r1/z2/s1"), &[]), 2);
        assert_eq!(locality_priority(&c, &loc("r2/z1/s1"), &[]), 3);
        assert_eq!(locality_priority(&c, &loc(""), &[]), 3);
        // Unknown levels on both sides compare equal.
        assert_eq!(locality_priority(&loc("r1/z1"), &loc("r1/z1"), &[]), 0);
    }

    #[test]
    fn failover_priorities() {
        let c = loc("r1/z1");
        let f = vec![("r1".to_string(), "r3".to_string())];
        assert_eq!(locality_priority(&c, &loc("r3/z9"), &f), 3);
        assert_eq!(locality_priority(&c, &loc("r2/z1"), &f), 4);
        assert_eq!(locality_priority(&c, &loc("r1/z2"), &f), 2);
        // Entry for another region does not apply.
        assert_eq!(locality_priority(&loc("r2/z1"), &loc("r4"), &f), 3);
    }

    #[test]
    fn dense_ranks() {
        assert_eq!(densify(&[3, 0, 3, 1]), (vec![2, 0, 2, 1], 3));
        assert_eq!(densify(&[]), (vec![], 0));
    }

    #[test]
    fn patterns() {
        let l = loc("us-west/zone1/sub1");
        for p in [
            "us-west",
            "us-west/*",
            "us-west/zone1",
            "us-west/zone1/*",
            "us-west/zone1/sub1",
            "*",
            "*/zone1",
        ] {
            assert!(locality_match(&l, p), "{p}");
        }
        for p in ["us-east", "us-west/zone2", "us-west/zone1/sub2", ""] {
            assert!(!locality_match(&l, p), "{p}");
        }
    }

    #[test]
    fn failover_priority_labels() {
        let client: Labels = [("app", "a"), ("version", "v1"), ("rack", "r1")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let spec = vec!["version".to_string(), "rack".to_string()];
        let cl = loc("r1/z1");
        let rules = PriorityLabels::new(&spec, Some(&client), &cl);
        let labels = |v: &str, r: &str| -> Labels {
            [("version", v), ("rack", r)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let any = loc("");
        assert_eq!(rules.priority(Some(&labels("v1", "r1")), &any), 0);
        assert_eq!(rules.priority(Some(&labels("v1", "r2")), &any), 1);
        assert_eq!(rules.priority(Some(&labels("v2", "r1")), &any), 2);
        assert_eq!(rules.priority(None, &any), 2);

        // Locality keys read the locality; `key=value` overrides the client.
        let spec = vec![ZONE.to_string(), "version=v2".to_string()];
        let rules = PriorityLabels::new(&spec, Some(&client), &cl);
        assert_eq!(rules.priority(Some(&labels("v2", "x")), &loc("r9/z1")), 0);
        assert_eq!(rules.priority(Some(&labels("v1", "x")), &loc("r9/z1")), 1);
        assert_eq!(rules.priority(Some(&labels("v2", "x")), &loc("r1/z2")), 2);
    }
}
