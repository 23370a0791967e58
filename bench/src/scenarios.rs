//! The run: every system in turn (A B C … A B C …, `mode.runs()` times),
//! each session running the scenarios' loads, then medians, tables, targets
//! and plots.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::{
    self, BYSTANDER, CLIENT, ECHO_PORT, Running, SERVER_A, System, World, cgroup_cpu_us,
    ebpf_run_ns, rss_kb,
};
use crate::model::{
    Latency, Load, LoadResult, Mode, Plot, PlotKind, Report, Scenario, Series, Table, TargetCheck,
};

/// Systems measured in every scenario, then the resilience variants
/// (scenario 8 only).
const MAIN: [System; 4] = [
    System::Direct,
    System::Haproxy,
    System::Nodeway,
    System::NodewaySockmap,
];
const RESILIENCE: [System; 2] = [System::HaproxyResilience, System::NodewayResilience];

const AUTHORITY_WEB: &str = "web.backend.svc.cluster.local";
const AUTHORITY_CLEAN: &str = "clean.backend.svc.cluster.local";
const AUTHORITY_FAULTY: &str = "faulty.backend.svc.cluster.local";
const PATH_1K: &str = "/size/1024";
const LOW_RATE: u64 = 1_000;
const RATE: u64 = 5_000;

/// One load's outcome with the CPU it cost.
#[derive(Clone, Debug, Default)]
struct Sample {
    r: LoadResult,
    /// Operations the proxy carried, warm-up included (CPU is divided by it).
    ops_total: f64,
    proxy_cpu_s: f64,
    ebpf_cpu_s: f64,
}

impl Sample {
    /// Proxy CPU (userspace + kernel of its cgroup, plus eBPF) per `n` ops.
    fn cpu_per(&self, n: f64) -> f64 {
        if self.ops_total <= 0.0 {
            return 0.0;
        }
        (self.proxy_cpu_s + self.ebpf_cpu_s) / self.ops_total * n
    }
}

#[derive(Default)]
struct Data {
    samples: HashMap<(System, &'static str), Vec<Sample>>,
    scalars: HashMap<(System, &'static str), Vec<f64>>,
    /// Errors seen, by "system / load": (runs with errors, errors, sent, messages).
    errors: std::collections::BTreeMap<String, ErrorNote>,
    notes: Vec<String>,
}

#[derive(Default)]
struct ErrorNote {
    runs: usize,
    errors: u64,
    sent: u64,
    messages: std::collections::BTreeSet<String>,
}

impl Data {
    fn samples(&self, s: System, key: &'static str) -> &[Sample] {
        self.samples.get(&(s, key)).map_or(&[], Vec::as_slice)
    }

    /// Median over runs of `f` applied to each sample.
    fn med(&self, s: System, key: &'static str, f: impl Fn(&Sample) -> f64) -> Option<f64> {
        let v: Vec<f64> = self.samples(s, key).iter().map(f).collect();
        median(v)
    }

    fn scalar(&self, s: System, key: &'static str) -> Option<f64> {
        median(self.scalars.get(&(s, key))?.clone())
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Sizes of things per mode.
struct Plan {
    mode: Mode,
    run_ms: u64,
    warmup_ms: u64,
    pingpongs: u64,
    idle: usize,
    saturation_start: u64,
    saturation_max: u64,
    /// Bystander runs per session.
    bystander_repeats: usize,
}

impl Plan {
    fn new(mode: Mode) -> Plan {
        Plan {
            mode,
            run_ms: mode.run_ms(),
            warmup_ms: mode.warmup_ms(),
            pingpongs: match mode {
                Mode::Smoke => 500,
                Mode::Quick => 5_000,
                Mode::Full => 20_000,
            },
            idle: match mode {
                Mode::Smoke => 200,
                Mode::Quick => 2_000,
                // Not 10 000: this machine's hard open-files limit is 20 000
                // (no CAP_SYS_RESOURCE) and HAProxy reserves two per
                // connection; growth is scaled to 10 000.
                Mode::Full => 9_000,
            },
            saturation_start: 2_000,
            saturation_max: match mode {
                Mode::Smoke => 2_000,
                _ => 80_000,
            },
            bystander_repeats: match mode {
                Mode::Smoke => 1,
                _ => 5,
            },
        }
    }

    fn http1(&self, target: SocketAddr, authority: &str, rate: u64, run_ms: u64) -> Load {
        Load::Http1 {
            target,
            authority: authority.into(),
            path: PATH_1K.into(),
            connections: 16,
            rate,
            duration_ms: run_ms,
            warmup_ms: self.warmup_ms,
        }
    }
}

/// Runs `load` in `pod` and charges the proxy's CPU to it.
fn measure(world: &World, running: &Running, pod: &str, load: &Load) -> Result<Sample, String> {
    let cpu0 = running.cgroup.as_deref().map_or(0, cgroup_cpu_us);
    let bpf0 = ebpf_run_ns();
    let r = world.load(pod, load)?;
    let cpu1 = running.cgroup.as_deref().map_or(0, cgroup_cpu_us);
    let bpf1 = ebpf_run_ns();
    let warmup_ops = match load {
        Load::Http1 {
            rate, warmup_ms, ..
        }
        | Load::H2 {
            rate, warmup_ms, ..
        }
        | Load::Grpc {
            rate, warmup_ms, ..
        } => (*rate as f64) * (*warmup_ms as f64) / 1000.0,
        Load::PingPong { warmup, .. } => *warmup as f64,
        _ => 0.0,
    };
    Ok(Sample {
        ops_total: r.sent as f64 + warmup_ops,
        proxy_cpu_s: cpu1.saturating_sub(cpu0) as f64 / 1e6,
        ebpf_cpu_s: bpf1.saturating_sub(bpf0) as f64 / 1e9,
        r,
    })
}

/// One system's session: start it, run its loads, stop it.
fn session(world: &World, system: System, plan: &Plan, data: &mut Data) -> Result<(), String> {
    let running = world.start(system)?;
    let put = |key: &'static str, s: Sample, data: &mut Data| {
        if s.r.errors > 0 {
            let note = data
                .errors
                .entry(format!("{} / {key}", system.name()))
                .or_default();
            note.runs += 1;
            note.errors += s.r.errors;
            note.sent += s.r.sent;
            note.messages.extend(s.r.error_samples.iter().cloned());
        }
        data.samples.entry((system, key)).or_default().push(s);
    };
    if let Some(pid) = running.proxy.as_ref().map(|p| p.pid()) {
        data.scalars
            .entry((system, "base_rss_kb"))
            .or_default()
            .push(rss_kb(pid) as f64);
    }
    let resilience_only = RESILIENCE.contains(&system);
    let mut loads: Vec<(&'static str, &str, Load)> = Vec::new();
    if !resilience_only {
        loads.push((
            "pingpong",
            CLIENT,
            Load::PingPong {
                target: system.echo(),
                size: 1024,
                count: plan.pingpongs,
                warmup: plan.pingpongs / 10,
            },
        ));
        for (key, rate) in [("h1_low", LOW_RATE), ("h1", RATE)] {
            let load = plan.http1(system.web(), AUTHORITY_WEB, rate, plan.run_ms);
            loads.push((key, CLIENT, load));
        }
        loads.push((
            "h2",
            CLIENT,
            Load::H2 {
                target: system.web(),
                authority: AUTHORITY_WEB.into(),
                path: PATH_1K.into(),
                connections: 4,
                streams: 100,
                rate: RATE,
                duration_ms: plan.run_ms,
                warmup_ms: plan.warmup_ms,
            },
        ));
        loads.push((
            "grpc",
            CLIENT,
            Load::Grpc {
                target: system.web(),
                authority: AUTHORITY_WEB.into(),
                mock_path: PATH_1K.into(),
                connections: 4,
                rate: RATE,
                duration_ms: plan.run_ms,
                warmup_ms: plan.warmup_ms,
            },
        ));
        loads.push((
            "conn",
            CLIENT,
            Load::ConnPerRequest {
                target: system.web(),
                authority: AUTHORITY_WEB.into(),
                path: PATH_1K.into(),
                concurrency: 4,
                duration_ms: plan.run_ms,
            },
        ));
        // Scenario 9: a pod that is not enrolled opens connections; the
        // programs are attached in Nodeway's sessions, not in direct's.
        loads.push((
            "bystander",
            BYSTANDER,
            Load::Connect {
                target: SocketAddr::from((SERVER_A, ECHO_PORT)),
                concurrency: 2,
                duration_ms: plan.run_ms,
            },
        ));
    }
    loads.push((
        "clean",
        CLIENT,
        plan.http1(system.clean(), AUTHORITY_CLEAN, RATE, plan.run_ms),
    ));
    loads.push((
        "faulty",
        CLIENT,
        plan.http1(system.faulty(), AUTHORITY_FAULTY, LOW_RATE, plan.run_ms),
    ));
    for (key, pod, load) in &loads {
        // The bystander's cost is a few percent at most: repeated, so that
        // its spread shows whether a difference is a cost or noise.
        let repeats = if *key == "bystander" {
            plan.bystander_repeats
        } else {
            1
        };
        for _ in 0..repeats {
            let s = measure(world, &running, pod, load)?;
            put(key, s, data);
        }
    }
    if !resilience_only {
        // After `h1_low`, whose p99 it compares with. A search that finds
        // no knee is a failed measurement: noted, never a value of 0.
        match saturation(world, &running, plan, data)? {
            Ok(sat) => data
                .scalars
                .entry((system, "saturation"))
                .or_default()
                .push(sat),
            Err(why) => data.notes.push(format!(
                "{} / saturation: not measured in this run: {why}",
                system.name()
            )),
        }
    }
    if !resilience_only {
        idle(world, &running, plan, data)?;
    }
    drop(running);
    // Let sockets of the stopped proxy leave TIME_WAIT pressure behind.
    std::thread::sleep(Duration::from_millis(200));
    Ok(())
}

/// Scenario 3: the highest fixed rate (steps of ×1.25) at which p99 stays
/// below twice this session's 1 000 req/s p99, errors below 0.1% and the
/// rate is actually achieved. The inner `Err` says why there is no figure:
/// no baseline, or the criterion failing already at the start rate (no knee
/// found, which must not read as "0 req/s").
fn saturation(
    world: &World,
    running: &Running,
    plan: &Plan,
    data: &Data,
) -> Result<Result<f64, String>, String> {
    let system = running.system;
    let Some(low_p99) = data
        .samples(system, "h1_low")
        .last()
        .map(|s| s.r.latency_us.p99)
        .filter(|p99| *p99 > 0.0)
    else {
        return Ok(Err("no 1 000 req/s p99 to compare with".into()));
    };
    let step_ms = (plan.run_ms / 2).max(300);
    let passes = |rate: u64| -> Result<Option<f64>, String> {
        let r = world.load(
            CLIENT,
            &plan.http1(system.web(), AUTHORITY_WEB, rate, step_ms),
        )?;
        let ok = r.latency_us.p99 < 2.0 * low_p99
            && (r.errors as f64) < 0.001 * r.sent.max(1) as f64
            && r.achieved_rate >= 0.95 * rate as f64;
        Ok(ok.then_some(r.achieved_rate))
    };
    let mut rate = plan.saturation_start;
    let mut best: Option<(u64, f64)> = None;
    let failed = loop {
        match passes(rate)? {
            Some(achieved) => best = Some((rate, achieved)),
            None => break rate,
        }
        let next = rate * 5 / 4;
        if next > plan.saturation_max {
            return Ok(best
                .map(|b| b.1)
                .ok_or_else(|| "the search's range is empty".to_string()));
        }
        rate = next;
    };
    if best.is_none() {
        return Ok(Err(format!(
            "the criterion failed already at the start rate of {failed} req/s \
             (p99 over 2× the 1 000 req/s p99 of {low_p99:.0} µs, errors, or the rate not reached): no knee found"
        )));
    }
    // Two bisection steps between the last rate that passed and the first
    // that failed: about 6% resolution instead of the ×1.25 step.
    if let Some((mut low, _)) = best {
        let mut high = failed;
        for _ in 0..2 {
            let mid = (low + high) / 2;
            match passes(mid)? {
                Some(achieved) => {
                    best = Some((mid, achieved));
                    low = mid;
                }
                None => high = mid,
            }
        }
    }
    Ok(best
        .map(|b| b.1)
        .ok_or_else(|| "no rate passed".to_string()))
}

/// Scenario 6: RSS before and while `plan.idle` keep-alive connections
/// stay open.
fn idle(world: &World, running: &Running, plan: &Plan, data: &mut Data) -> Result<(), String> {
    let system = running.system;
    let pid = running.proxy.as_ref().map(|p| p.pid());
    let before = pid.map_or(0, rss_kb);
    let holder = world.hold_idle(
        CLIENT,
        &Load::Idle {
            target: system.web(),
            authority: AUTHORITY_WEB.into(),
            path: PATH_1K.into(),
            count: plan.idle,
            opens_per_sec: 5_000,
        },
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let during = pid.map_or(0, rss_kb);
    let (open, errors) = (holder.open, holder.errors);
    let _ = holder.finish()?;
    if errors > 0 || open < plan.idle as u64 {
        data.notes.push(format!(
            "{} / idle: {open} of {} connections open, {errors} errors",
            system.name(),
            plan.idle
        ));
    }
    if pid.is_some() && open > 0 {
        let per_10k = (during.saturating_sub(before)) as f64 / 1024.0 * 10_000.0 / open as f64;
        data.scalars
            .entry((system, "idle_mb_per_10k"))
            .or_default()
            .push(per_10k);
        data.scalars
            .entry((system, "rss_idle_mb"))
            .or_default()
            .push(during as f64 / 1024.0);
    }
    Ok(())
}

/// Everything: world, sessions, config scale, report.
pub fn run(mode: Mode, nodeway_bin: &Path, out: &Path) -> Result<Report, String> {
    let started = Instant::now();
    let plan = Plan::new(mode);
    let bench_bin = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let old_stats = harness::enable_bpf_stats()?;
    let result = (|| {
        let world = World::new(&bench_bin, nodeway_bin, &out.join("logs"))?;
        let mut data = Data::default();
        for run in 0..mode.runs() {
            for system in MAIN.iter().chain(RESILIENCE.iter()) {
                eprintln!(
                    "bench: run {}/{} {} ({:.0} s)",
                    run + 1,
                    mode.runs(),
                    system.name(),
                    started.elapsed().as_secs_f64()
                );
                session(&world, *system, &plan, &mut data)?;
            }
        }
        Ok::<Data, String>(data)
    })();
    harness::restore_bpf_stats(&old_stats);
    let data = result?;
    eprintln!(
        "bench: config scale ({:.0} s)",
        started.elapsed().as_secs_f64()
    );
    let scale = crate::config_scale::run(nodeway_bin, mode)?;
    let mut report = build_report(&plan, &data, scale);
    report.machine = crate::machine(nodeway_bin);
    report.duration_s = started.elapsed().as_secs_f64();
    Ok(report)
}

fn us(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.0}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b.abs() > f64::EPSILON => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

fn pct(v: f64) -> String {
    format!("{v:.1}%")
}

/// Checks `measured ≤ limit` (or `≥` when `at_least`).
fn target(
    name: &str,
    measured: Option<f64>,
    limit: Option<f64>,
    at_least: bool,
    show: impl Fn(f64) -> String,
) -> TargetCheck {
    match (measured, limit) {
        (Some(m), Some(l)) => {
            // A hair of tolerance: 0.8 × 3906.25 must accept 3125.
            let met = if at_least {
                m >= l * (1.0 - 1e-9)
            } else {
                m <= l * (1.0 + 1e-9)
            };
            // In the target's own unit (percentage points for targets that
            // are percentages), so "5%" limits do not read as "+1573%".
            let missed_by = if met {
                String::new()
            } else if at_least {
                format!("{} short of the limit", show(l - m))
            } else {
                format!("{} over the limit", show(m - l))
            };
            TargetCheck {
                target: name.into(),
                measured: format!("{} (limit {})", show(m), show(l)),
                met,
                missed_by,
            }
        }
        _ => TargetCheck {
            target: name.into(),
            measured: "not measured".into(),
            met: false,
            missed_by: "no data".into(),
        },
    }
}

fn lat(l: &Latency) -> [f64; 4] {
    [l.p50, l.p99, l.p999, l.mean]
}

fn build_report(plan: &Plan, d: &Data, scale: Scenario) -> Report {
    let mode = plan.mode;
    let mut scenarios = Vec::new();
    let mut targets = Vec::new();
    let p = |s: System, key: &'static str, i: usize| d.med(s, key, |x| lat(&x.r.latency_us)[i]);
    let added =
        |s: System, key: &'static str, i: usize| Some(p(s, key, i)? - p(System::Direct, key, i)?);
    let proxies = [System::Haproxy, System::Nodeway, System::NodewaySockmap];

    // 1. L4 ping-pong.
    let mut t = Table {
        title: "1 KiB ping-pong on one connection (µs)".into(),
        columns: vec![
            "system".into(),
            "mean".into(),
            "p99".into(),
            "added mean".into(),
            "added p99".into(),
            "added mean vs HAProxy".into(),
        ],
        rows: vec![],
    };
    for s in MAIN {
        t.rows.push(vec![
            if s == System::Haproxy {
                "HAProxy (mode tcp)".into()
            } else {
                s.name().into()
            },
            us(p(s, "pingpong", 3)),
            us(p(s, "pingpong", 1)),
            us(added(s, "pingpong", 3)),
            us(added(s, "pingpong", 1)),
            ratio(
                added(s, "pingpong", 3),
                added(System::Haproxy, "pingpong", 3),
            ),
        ]);
    }
    for s in [System::Nodeway, System::NodewaySockmap] {
        targets.push(target(
            &format!("L4 added round trip ≤ 1.2× HAProxy tcp mode ({})", s.name()),
            added(s, "pingpong", 3),
            added(System::Haproxy, "pingpong", 3).map(|v| v * 1.2),
            false,
            |v| format!("{v:.0} µs"),
        ));
    }
    scenarios.push(Scenario {
        id: 1,
        title: "L4 round trip".into(),
        setup: format!(
            "One TCP connection, 1 KiB written and read back, {} round trips after {} warm-up; \
             Nodeway on a `tcp-` service port (plain TCP relay), HAProxy in `mode tcp`.",
            plan.pingpongs,
            plan.pingpongs / 10
        ),
        tables: vec![t],
        notes: vec![],
    });

    // 2. HTTP/1.1 keep-alive at 1 000 and 5 000 req/s.
    let mut tables = Vec::new();
    for (key, rate) in [("h1_low", LOW_RATE), ("h1", RATE)] {
        let mut t = Table {
            title: format!("{rate} req/s, 16 connections (µs)"),
            columns: [
                "system",
                "p50",
                "p99",
                "p99.9",
                "added p50",
                "added p99",
                "added p99.9",
                "added p99 vs HAProxy",
            ]
            .map(String::from)
            .to_vec(),
            rows: vec![],
        };
        for s in MAIN {
            t.rows.push(vec![
                s.name().into(),
                us(p(s, key, 0)),
                us(p(s, key, 1)),
                us(p(s, key, 2)),
                us(added(s, key, 0)),
                us(added(s, key, 1)),
                us(added(s, key, 2)),
                ratio(added(s, key, 1), added(System::Haproxy, key, 1)),
            ]);
        }
        tables.push(t);
        for s in [System::Nodeway, System::NodewaySockmap] {
            targets.push(target(
                &format!("added p50 ≤ HAProxy's, {rate} req/s ({})", s.name()),
                added(s, key, 0),
                added(System::Haproxy, key, 0),
                false,
                |v| format!("{v:.0} µs"),
            ));
            targets.push(target(
                &format!("added p99 ≤ 1.25× HAProxy's, {rate} req/s ({})", s.name()),
                added(s, key, 1),
                added(System::Haproxy, key, 1).map(|v| v * 1.25),
                false,
                |v| format!("{v:.0} µs"),
            ));
        }
    }
    scenarios.push(Scenario {
        id: 2,
        title: "HTTP/1.1 keep-alive".into(),
        setup: format!(
            "GET of a 1 KiB body over 16 keep-alive connections at a fixed rate, {} ms recorded \
             after {} ms warm-up; latency from each request's due time when its connection was \
             busy (no coordinated omission).",
            plan.run_ms, plan.warmup_ms
        ),
        tables,
        notes: vec![],
    });

    // 3. Saturation.
    let mut t = Table {
        title: "highest fixed rate with p99 < 2× the 1 000 req/s p99 and < 0.1% errors".into(),
        columns: ["system", "req/s", "vs HAProxy"].map(String::from).to_vec(),
        rows: vec![],
    };
    for s in MAIN {
        t.rows.push(vec![
            s.name().into(),
            us(d.scalar(s, "saturation")),
            ratio(
                d.scalar(s, "saturation"),
                d.scalar(System::Haproxy, "saturation"),
            ),
        ]);
    }
    for s in [System::Nodeway, System::NodewaySockmap] {
        targets.push(target(
            &format!("saturation ≥ 0.8× HAProxy's ({})", s.name()),
            d.scalar(s, "saturation"),
            d.scalar(System::Haproxy, "saturation").map(|v| v * 0.8),
            true,
            |v| format!("{v:.0} req/s"),
        ));
    }
    scenarios.push(Scenario {
        id: 3,
        title: "Saturation point".into(),
        setup: format!(
            "Fixed-rate HTTP/1.1 steps of ×1.25 from {} req/s (16 connections, {} ms each) \
             until the criterion fails, then two bisection steps; the achieved rate of the \
             highest step that passed.",
            plan.saturation_start,
            (plan.run_ms / 2).max(300)
        ),
        tables: vec![t],
        notes: vec![
            "The generator and the backends share one core, so the direct path's figure is \
             the generator's and backend's limit, not the network's."
                .into(),
        ],
    });

    // 4. CPU per 10k requests.
    let cpu = |s: System, key: &'static str| d.med(s, key, |x| x.cpu_per(10_000.0));
    let ebpf_part = |s: System, key: &'static str| {
        d.med(s, key, |x| {
            if x.ops_total > 0.0 {
                x.ebpf_cpu_s / x.ops_total * 10_000.0
            } else {
                0.0
            }
        })
    };
    let mut t = Table {
        title: "CPU-seconds per 10 000 requests at 5 000 req/s (proxy cgroup + eBPF)".into(),
        columns: ["system", "total", "of which eBPF", "vs HAProxy"]
            .map(String::from)
            .to_vec(),
        rows: vec![],
    };
    for s in proxies {
        t.rows.push(vec![
            s.name().into(),
            cpu(s, "h1").map_or("–".into(), |v| format!("{v:.3}")),
            ebpf_part(s, "h1").map_or("–".into(), |v| format!("{v:.4}")),
            ratio(cpu(s, "h1"), cpu(System::Haproxy, "h1")),
        ]);
    }
    for s in [System::Nodeway, System::NodewaySockmap] {
        targets.push(target(
            &format!("CPU per 10k requests ≤ 1.2× HAProxy's ({})", s.name()),
            cpu(s, "h1"),
            cpu(System::Haproxy, "h1").map(|v| v * 1.2),
            false,
            |v| format!("{v:.3} s"),
        ));
    }
    scenarios.push(Scenario {
        id: 4,
        title: "CPU per 10 000 requests".into(),
        setup: "Scenario 2's 5 000 req/s runs (warm-up included in both CPU and request \
                count): the proxy's cgroup `cpu.stat` usage plus the eBPF programs' run time \
                (`bpftool prog`, `kernel.bpf_stats_enabled=1`)."
            .into(),
        tables: vec![t],
        notes: vec![],
    });

    // 5. New connection per request.
    let mut t = Table {
        title: "connect + one request + close, 4 workers".into(),
        columns: [
            "system",
            "connections/s",
            "p50 µs",
            "p99 µs",
            "CPU-s per 1 000 connections",
        ]
        .map(String::from)
        .to_vec(),
        rows: vec![],
    };
    for s in MAIN {
        t.rows.push(vec![
            s.name().into(),
            us(d.med(s, "conn", |x| x.r.achieved_rate)),
            us(p(s, "conn", 0)),
            us(p(s, "conn", 1)),
            if s == System::Direct {
                "–".into()
            } else {
                d.med(s, "conn", |x| x.cpu_per(1_000.0))
                    .map_or("–".into(), |v| format!("{v:.3}"))
            },
        ]);
    }
    scenarios.push(Scenario {
        id: 5,
        title: "New connection per request".into(),
        setup: format!(
            "Closed loop, 4 workers each connecting, sending one GET with `connection: close`, \
             reading the 1 KiB answer and closing, for {} ms.",
            plan.run_ms
        ),
        tables: vec![t],
        notes: vec![],
    });

    // 6. Idle connections.
    let mut t = Table {
        title: format!("{} idle keep-alive connections", plan.idle),
        columns: [
            "system",
            "base RSS MB",
            "RSS with the connections MB",
            "growth per 10 000 MB",
        ]
        .map(String::from)
        .to_vec(),
        rows: vec![],
    };
    for s in proxies {
        t.rows.push(vec![
            s.name().into(),
            d.scalar(s, "base_rss_kb")
                .map_or("–".into(), |v| format!("{:.1}", v / 1024.0)),
            d.scalar(s, "rss_idle_mb")
                .map_or("–".into(), |v| format!("{v:.1}")),
            d.scalar(s, "idle_mb_per_10k")
                .map_or("–".into(), |v| format!("{v:.1}")),
        ]);
    }
    for s in [System::Nodeway, System::NodewaySockmap] {
        targets.push(target(
            &format!("≤ 40 MB per 10 000 idle connections ({})", s.name()),
            d.scalar(s, "idle_mb_per_10k"),
            Some(40.0),
            false,
            |v| format!("{v:.1} MB"),
        ));
        targets.push(target(
            &format!("base RSS ≤ 20 MB ({})", s.name()),
            d.scalar(s, "base_rss_kb").map(|v| v / 1024.0),
            Some(20.0),
            false,
            |v| format!("{v:.1} MB"),
        ));
    }
    scenarios.push(Scenario {
        id: 6,
        title: "Idle connections".into(),
        setup: "RSS (`smaps_rollup`) right after start (config loaded, no traffic), then \
                with the connections open, each having carried one request."
            .into(),
        tables: vec![t],
        notes: vec![],
    });

    // 7. HTTP/2 and gRPC.
    let mut t = Table {
        title: "5 000 req/s (µs; CPU-s per 10 000 requests)".into(),
        columns: [
            "system",
            "h2 p50",
            "h2 p99",
            "h2 added p99",
            "h2 CPU/10k",
            "gRPC p50",
            "gRPC p99",
            "gRPC added p99",
            "gRPC CPU/10k",
        ]
        .map(String::from)
        .to_vec(),
        rows: vec![],
    };
    for s in MAIN {
        let c = |key: &'static str| {
            if s == System::Direct {
                "–".into()
            } else {
                cpu(s, key).map_or("–".into(), |v| format!("{v:.3}"))
            }
        };
        t.rows.push(vec![
            s.name().into(),
            us(p(s, "h2", 0)),
            us(p(s, "h2", 1)),
            us(added(s, "h2", 1)),
            c("h2"),
            us(p(s, "grpc", 0)),
            us(p(s, "grpc", 1)),
            us(added(s, "grpc", 1)),
            c("grpc"),
        ]);
    }
    for s in [System::Nodeway, System::NodewaySockmap] {
        for (key, label) in [("h2", "HTTP/2"), ("grpc", "gRPC")] {
            targets.push(target(
                &format!("{label} added p99 ≤ 1.25× HAProxy's ({})", s.name()),
                added(s, key, 1),
                added(System::Haproxy, key, 1).map(|v| v * 1.25),
                false,
                |v| format!("{v:.0} µs"),
            ));
            targets.push(target(
                &format!(
                    "{label} CPU per 10k requests ≤ 1.2× HAProxy's ({})",
                    s.name()
                ),
                cpu(s, key),
                cpu(System::Haproxy, key).map(|v| v * 1.2),
                false,
                |v| format!("{v:.3} s"),
            ));
        }
    }
    scenarios.push(Scenario {
        id: 7,
        title: "HTTP/2 and gRPC".into(),
        setup: "h2c with prior knowledge, 4 connections × up to 100 concurrent streams, GET \
                1 KiB; gRPC unary (1 KiB reply) over 4 HTTP/2 connections; both at a fixed \
                5 000 req/s."
            .into(),
        tables: vec![t],
        notes: vec![],
    });

    // 8. Resilience.
    let mut t = Table {
        title: "overhead: `clean` (2 healthy endpoints), 5 000 req/s".into(),
        columns: ["system", "p50 µs", "p99 µs", "CPU-s per 10k", "errors"]
            .map(String::from)
            .to_vec(),
        rows: vec![],
    };
    let all8 = [
        System::Direct,
        System::Haproxy,
        System::HaproxyResilience,
        System::Nodeway,
        System::NodewayResilience,
    ];
    for s in all8 {
        t.rows.push(vec![
            s.name().into(),
            us(p(s, "clean", 0)),
            us(p(s, "clean", 1)),
            if s == System::Direct {
                "–".into()
            } else {
                cpu(s, "clean").map_or("–".into(), |v| format!("{v:.3}"))
            },
            us(d.med(s, "clean", |x| x.r.errors as f64)),
        ]);
    }
    let mut f = Table {
        title: "faults: `faulty` (2 endpoints answering 10% 503, 1 refusing), 1 000 req/s".into(),
        columns: ["system", "success rate", "p50 µs", "p99 µs"]
            .map(String::from)
            .to_vec(),
        rows: vec![],
    };
    for s in all8 {
        f.rows.push(vec![
            s.name().into(),
            d.med(s, "faulty", |x| {
                100.0 * x.r.ok as f64 / (x.r.sent.max(1)) as f64
            })
            .map_or("–".into(), pct),
            us(p(s, "faulty", 0)),
            us(p(s, "faulty", 1)),
        ]);
    }
    let over = |get: &dyn Fn(System) -> Option<f64>| {
        Some(get(System::NodewayResilience)? / get(System::Nodeway)? * 100.0 - 100.0)
    };
    targets.push(target(
        "resilience overhead ≤ 5% CPU",
        over(&|s| cpu(s, "clean")),
        Some(5.0),
        false,
        |v| format!("{v:+.1}%"),
    ));
    targets.push(target(
        "resilience overhead ≤ 5% p99",
        over(&|s| p(s, "clean", 1)),
        Some(5.0),
        false,
        |v| format!("{v:+.1}%"),
    ));
    scenarios.push(Scenario {
        id: 8,
        title: "Resilience".into(),
        setup: "Nodeway + resilience: DestinationRule (LEAST_REQUEST, pool limits, \
                consecutive5xxErrors 5 / 1 s / 30 s) and VirtualService (2 retries on \
                5xx,connect-failure,reset, perTryTimeout 2 s, timeout 5 s). HAProxy + \
                resilience: `retries 2`, `retry-on 503 conn-failure empty-response \
                response-timeout`, `option redispatch`, `observe layer7 error-limit 5 on-error \
                mark-down`, `maxconn`."
            .into(),
        tables: vec![t, f],
        notes: vec![
            "Without resilience, neither proxy checks health. HAProxy retries a refused \
             connection to the same server 3 times, 1 s apart (its turn-around timer), so at \
             1 000 req/s its queue grows without bound and requests are still waiting when \
             the run ends (counted as failures). Nodeway applies Istio's default retry policy \
             (2 retries on connect-failure, refused-stream, unavailable, cancelled, \
             retriable-status-codes with 503, 25 ms base back-off), so most requests succeed, late."
                .into(),
        ],
    });

    // 9. Bystander.
    let mut t = Table {
        title: "TCP connect + close from a pod that is not enrolled, 2 workers".into(),
        columns: ["programs", "connections/s", "p50 µs", "p99 µs", "cost"]
            .map(String::from)
            .to_vec(),
        rows: vec![],
    };
    let rate = |s: System| d.med(s, "bystander", |x| x.r.achieved_rate);
    let cost = |s: System| Some((1.0 - rate(s)? / rate(System::Direct)?) * 100.0);
    // Noise: the spread (interquartile range) of the direct runs' own rates,
    // as a percentage of their median. A cost inside it is not a cost.
    let spread = {
        let mut v: Vec<f64> = d
            .samples(System::Direct, "bystander")
            .iter()
            .map(|x| x.r.achieved_rate)
            .collect();
        v.sort_by(f64::total_cmp);
        let q = |f: f64| {
            v.get(((v.len() as f64 - 1.0) * f).round() as usize)
                .copied()
        };
        match (q(0.25), q(0.75), median(v.clone())) {
            (Some(lo), Some(hi), Some(m)) if m > 0.0 => Some((hi - lo) / m * 100.0),
            _ => None,
        }
    };
    let runs = d.samples(System::Direct, "bystander").len();
    for (label, s) in [
        ("not attached (no Nodeway)", System::Direct),
        ("attached (Nodeway, sockmap off)", System::Nodeway),
        ("attached (Nodeway, sockmap on)", System::NodewaySockmap),
    ] {
        t.rows.push(vec![
            label.into(),
            us(rate(s)),
            us(p(s, "bystander", 0)),
            us(p(s, "bystander", 1)),
            cost(s).map_or("–".into(), pct),
        ]);
    }
    for s in [System::Nodeway, System::NodewaySockmap] {
        targets.push(target(
            &format!("bystander cost ≤ 5% ({})", s.name()),
            cost(s),
            Some(5.0),
            false,
            |v| format!("{v:.1}%"),
        ));
    }
    scenarios.push(Scenario {
        id: 9,
        title: "Bystander cost".into(),
        setup: "Connection rate of the non-enrolled pod to a backend pod IP, while no \
                programs are attached (direct session) and while Nodeway's are (its \
                `connect4` runs on every connect below the attach point and lets it pass)."
            .into(),
        tables: vec![t],
        notes: vec![format!(
            "{runs} runs per system (interleaved sessions × repeats); the direct runs' own \
             spread (interquartile range / median) is {}: a cost smaller than that is noise.",
            spread.map_or("–".into(), pct)
        )],
    });

    scenarios.push(scale);

    // Sockmap decision.
    let gain = |a: Option<f64>, b: Option<f64>| Some((1.0 - a? / b?) * 100.0);
    let lat_gain = gain(
        added(System::NodewaySockmap, "h1", 0),
        added(System::Nodeway, "h1", 0),
    );
    let cpu_gain = gain(
        cpu(System::NodewaySockmap, "h1"),
        cpu(System::Nodeway, "h1"),
    );
    let p999_ok = match (
        p(System::NodewaySockmap, "h1", 2),
        p(System::Nodeway, "h1", 2),
    ) {
        (Some(on), Some(off)) => on <= off * 1.05,
        _ => false,
    };
    let best_gain = lat_gain
        .unwrap_or(f64::MIN)
        .max(cpu_gain.unwrap_or(f64::MIN));
    targets.push(TargetCheck {
        target: "sockmap on by default only with ≥ 15% lower added latency or CPU, no p99.9 \
                 regression"
            .into(),
        measured: format!(
            "added p50 {}, CPU {}, p99.9 {} → the default should be {}",
            lat_gain.map_or("–".into(), |v| format!("{v:+.1}% lower")),
            cpu_gain.map_or("–".into(), |v| format!("{v:+.1}% lower")),
            if p999_ok {
                "no regression"
            } else {
                "regressed"
            },
            if best_gain >= 15.0 && p999_ok {
                "on"
            } else {
                "off"
            }
        ),
        met: true,
        missed_by: String::new(),
    });

    // Plots.
    let mut plots = Vec::new();
    let mut series = Vec::new();
    for s in MAIN {
        // The run whose p99 is the median one, so the curve matches the table.
        let mut v: Vec<&Sample> = d.samples(s, "h1").iter().collect();
        v.sort_by(|a, b| a.r.latency_us.p99.total_cmp(&b.r.latency_us.p99));
        if let Some(mid) = v.get(v.len() / 2) {
            series.push(Series {
                name: s.name().into(),
                points: mid.r.curve.clone(),
            });
        }
    }
    plots.push(Plot {
        file: "latency-http1-5k.png".into(),
        title: "HTTP/1.1 latency by percentile, 5 000 req/s, 16 connections".into(),
        kind: PlotKind::PercentileCurves {
            y_label: "latency (µs)".into(),
            series,
        },
    });
    let mut bars = Vec::new();
    for s in proxies {
        for (key, label) in [("h1", "HTTP/1.1"), ("h2", "h2"), ("grpc", "gRPC")] {
            if let Some(v) = cpu(s, key) {
                bars.push((format!("{} {label}", s.name()), v));
            }
        }
    }
    plots.push(Plot {
        file: "cpu-per-10k.png".into(),
        title: "Proxy CPU-seconds per 10 000 requests at 5 000 req/s".into(),
        kind: PlotKind::Bars {
            y_label: "CPU-seconds".into(),
            bars,
        },
    });

    let mut method = vec![
        "Topology: network namespaces with no uplink: client pod ↔ node ↔ backend pods (veth \
         pairs), kube-proxy's DNAT by nftables for the direct path. Nodeway runs with \
         `--redirect ebpf` (client namespace enrolled, backends not), one worker thread; \
         HAProxy (`nbthread 1`, `http-reuse always`) runs inside the client pod and the \
         client dials it on the pod's loopback. Proxies are pinned to CPU 0, the generator \
         and backends to CPU 1. Access logs are off for both proxies."
            .into(),
        "Load: the project's open-loop generator (`nodeway-bench gen`): a pacer thread hands \
         each request its due time; a request whose connection is still busy at its due time \
         is charged from the due time (coordinated omission corrected), otherwise from its \
         send. HDR histograms (1 µs resolution). Backend: the project's mock upstream on one \
         thread, 1 KiB bodies."
            .into(),
        format!(
            "Each figure is the median of {} interleaved runs (every system in turn, then \
             again); added latency = the system's percentile minus direct's, both medians.",
            mode.runs()
        ),
    ];
    if mode != Mode::Full {
        method.push(format!(
            "This is a `{}` run: fewer and shorter runs than the full benchmark; do not \
             quote its numbers.",
            mode.name()
        ));
    }
    for (what, e) in &d.errors {
        let messages: Vec<&str> = e.messages.iter().map(String::as_str).collect();
        method.push(format!(
            "Errors seen: {what}: {} of {} requests in {} of {} runs ({}).",
            e.errors,
            e.sent,
            e.runs,
            mode.runs(),
            messages.join("; ")
        ));
    }
    for n in &d.notes {
        method.push(format!("Seen during the run: {n}"));
    }
    Report {
        mode: mode.name().into(),
        date: crate::utc_now(),
        machine: Default::default(),
        duration_s: 0.0,
        runs: mode.runs(),
        method,
        scenarios,
        targets,
        plots,
    }
}
