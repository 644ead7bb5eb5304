//! The metrics as a Prometheus server reads them: every test parses the exposition with
//! `prometheus-parse`, a real text-format parser, never with string matching.

use std::time::Duration;

use prometheus_parse::{HistogramCount, Scrape, Value};

use super::*;

/// The exposition, parsed.
pub(crate) fn scrape(metrics: &Metrics) -> Scrape {
    let text = metrics.encode().expect("the metrics encode");
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    Scrape::parse(text.lines().map(|line| Ok(line.to_owned()))).expect("the exposition parses")
}

/// The value of the sample `name` whose labels include `labels` (counters, gauges, and a
/// histogram's `_sum` and `_count`); `None` if there is none.
pub(crate) fn sample(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape(metrics)
        .samples
        .into_iter()
        .filter(|sample| sample.metric == name)
        .find(|sample| {
            labels
                .iter()
                .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
        .and_then(|sample| match sample.value {
            Value::Counter(value) | Value::Gauge(value) | Value::Untyped(value) => Some(value),
            Value::Histogram(_) | Value::Summary(_) => None,
        })
}

/// The cumulative buckets of the histogram `name` whose labels include `labels`.
fn buckets(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> Vec<HistogramCount> {
    scrape(metrics)
        .samples
        .into_iter()
        .find(|sample| {
            sample.metric == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(key) == Some(*value))
        })
        .and_then(|sample| match sample.value {
            Value::Histogram(buckets) => Some(buckets),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no histogram {name} {labels:?}"))
}

#[test]
fn per_vm_counters_move_and_stay_apart() {
    let metrics = Metrics::new();
    let vm0 = metrics.vm("vm0");
    let vm1 = metrics.vm("vm1");
    let vm = |name| [("vm", name)];

    // Every VM's series exist at 0 from the start (a scrape sees no gaps).
    assert_eq!(
        sample(
            &metrics,
            "gantry_blk_requests_total",
            &[("vm", "vm1"), ("op", "read")]
        ),
        Some(0.0)
    );

    vm0.blk
        .completed(BlkOp::Read, true, 4096, Duration::from_micros(30));
    vm0.blk
        .completed(BlkOp::Read, true, 8192, Duration::from_millis(3));
    vm0.blk
        .completed(BlkOp::Write, false, 0, Duration::from_micros(5));
    vm0.blk.malformed();
    vm0.blk.parked();
    vm1.blk
        .completed(BlkOp::Flush, true, 0, Duration::from_micros(5));
    let read = [("vm", "vm0"), ("op", "read")];
    assert_eq!(
        sample(&metrics, "gantry_blk_requests_total", &read),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "gantry_blk_requests_total",
            &[("vm", "vm0"), ("op", "malformed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "gantry_blk_read_bytes_total", &vm("vm0")),
        Some(12288.0)
    );
    assert_eq!(
        sample(&metrics, "gantry_blk_errors_total", &vm("vm0")),
        Some(2.0),
        "the refused write and the malformed chain"
    );
    assert_eq!(
        sample(&metrics, "gantry_blk_parked_total", &vm("vm0")),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "gantry_blk_request_duration_seconds_count",
            &vm("vm0")
        ),
        Some(3.0),
        "malformed chains have no duration"
    );
    assert_eq!(
        sample(&metrics, "gantry_blk_errors_total", &vm("vm1")),
        Some(0.0)
    );
    assert_eq!(vm1.blk.requests(BlkOp::Flush), 1);

    vm0.vsock.guest_packet(true, 0);
    vm0.vsock.guest_packet(false, 5);
    vm0.vsock.data_to_guest(1000, true);
    vm0.vsock.data_to_guest(20, false);
    assert_eq!(
        sample(&metrics, "gantry_vsock_connections_total", &vm("vm0")),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "gantry_vsock_bytes_total",
            &[("vm", "vm0"), ("direction", "to_guest")]
        ),
        Some(1020.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "gantry_vsock_bytes_total",
            &[("vm", "vm0"), ("direction", "from_guest")]
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(&metrics, "gantry_vsock_credit_stalls_total", &vm("vm0")),
        Some(1.0)
    );

    vm1.containers.started(Duration::from_millis(700));
    vm1.containers.start_failed();
    vm1.containers.exited();
    vm1.containers.oom_killed();
    vm1.containers.first_output(Duration::from_millis(900));
    for (name, value) in [
        ("gantry_container_starts_total", 1.0),
        ("gantry_container_start_failures_total", 1.0),
        ("gantry_container_exits_total", 1.0),
        ("gantry_container_ooms_total", 1.0),
        ("gantry_container_start_duration_seconds_count", 1.0),
        ("gantry_container_first_output_duration_seconds_count", 1.0),
    ] {
        assert_eq!(sample(&metrics, name, &vm("vm1")), Some(value), "{name}");
        assert_eq!(sample(&metrics, name, &vm("vm0")), Some(0.0), "{name}");
    }
}

#[test]
fn cache_and_source_counters_move() {
    let metrics = Metrics::new();
    let cache = metrics.cache();
    cache.hit();
    cache.hit();
    cache.miss();
    cache.evicted([100, 23]);
    assert_eq!(sample(&metrics, "gantry_cache_hits_total", &[]), Some(2.0));
    assert_eq!(
        sample(&metrics, "gantry_cache_misses_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "gantry_cache_evictions_total", &[]),
        Some(2.0)
    );
    assert_eq!(
        sample(&metrics, "gantry_cache_evicted_bytes_total", &[]),
        Some(123.0)
    );

    let registry = metrics.source(SourceKind::Registry, "registry.example:5000");
    registry.request(1000, false);
    registry.request(0, true);
    let peer = metrics.source(SourceKind::Peer, "http://10.0.0.2:7420");
    peer.request(50, false);
    peer.bad_bytes();
    // Handles resolved again count into the same series.
    metrics
        .source(SourceKind::Registry, "registry.example:5000")
        .request(1, false);
    let at = |kind, source| [("kind", kind), ("source", source)];
    let registry_labels = at("registry", "registry.example:5000");
    assert_eq!(
        sample(&metrics, "gantry_registry_requests_total", &registry_labels),
        Some(3.0)
    );
    assert_eq!(
        sample(&metrics, "gantry_registry_bytes_total", &registry_labels),
        Some(1001.0)
    );
    assert_eq!(
        sample(&metrics, "gantry_registry_errors_total", &registry_labels),
        Some(1.0)
    );
    let peer_labels = at("peer", "http://10.0.0.2:7420");
    assert_eq!(
        sample(&metrics, "gantry_registry_bytes_total", &peer_labels),
        Some(50.0)
    );
    assert_eq!(
        sample(&metrics, "gantry_registry_errors_total", &peer_labels),
        Some(1.0),
        "bytes that failed verification count as the peer's error"
    );
}

#[test]
fn histogram_buckets_are_cumulative_with_sum_and_count() {
    let metrics = Metrics::new();
    let blk = metrics.vm("vm0").blk;
    for elapsed in [
        Duration::from_micros(20),
        Duration::from_micros(50),
        Duration::from_micros(700),
        Duration::from_secs(2),
        Duration::from_secs(100),
    ] {
        blk.completed(BlkOp::Read, true, 0, elapsed);
    }
    let buckets = buckets(
        &metrics,
        "gantry_blk_request_duration_seconds",
        &[("vm", "vm0")],
    );
    let count_at = |bound: f64| {
        buckets
            .iter()
            .find(|bucket| bucket.less_than == bound)
            .map(|bucket| bucket.count)
            .unwrap_or_else(|| panic!("no bucket le={bound}: {buckets:?}"))
    };
    assert_eq!(count_at(0.000_05), 2.0, "a bound is inclusive");
    assert_eq!(count_at(0.000_5), 2.0);
    assert_eq!(count_at(0.001), 3.0);
    assert_eq!(count_at(2.5), 4.0);
    assert_eq!(count_at(30.0), 4.0);
    assert_eq!(count_at(f64::INFINITY), 5.0);
    assert_eq!(buckets.len(), histogram::REQUEST_BUCKETS.len() + 1);
    let labels = [("vm", "vm0")];
    assert_eq!(
        sample(
            &metrics,
            "gantry_blk_request_duration_seconds_count",
            &labels
        ),
        Some(5.0)
    );
    let sum = sample(&metrics, "gantry_blk_request_duration_seconds_sum", &labels)
        .expect("a _sum sample");
    assert!((sum - 102.000_77).abs() < 1e-6, "sum {sum}");
}

#[test]
fn sources_beyond_the_bound_share_one_series() {
    let metrics = Metrics::new();
    for i in 0..MAX_SOURCES + 10 {
        metrics
            .source(SourceKind::Registry, &format!("registry-{i}.example"))
            .request(1, false);
    }
    // A source admitted before the bound keeps its own series.
    metrics
        .source(SourceKind::Registry, "registry-0.example")
        .request(1, false);
    let series: Vec<_> = scrape(&metrics)
        .samples
        .into_iter()
        .filter(|sample| sample.metric == "gantry_registry_requests_total")
        .collect();
    assert_eq!(series.len(), MAX_SOURCES + 1, "the admitted ones and other");
    let requests = |source| {
        sample(
            &metrics,
            "gantry_registry_requests_total",
            &[("source", source)],
        )
    };
    assert_eq!(requests("registry-0.example"), Some(2.0));
    assert_eq!(requests(OTHER_SOURCE), Some(10.0));
    assert_eq!(
        requests(&format!("registry-{}.example", MAX_SOURCES)),
        None,
        "past the bound a name gets no series of its own"
    );
}

#[test]
fn state_gauges_come_from_the_probe_at_each_scrape() {
    let metrics = Metrics::new();
    assert_eq!(
        sample(&metrics, "gantry_cache_budget_bytes", &[]),
        None,
        "no probe, no gauges"
    );
    let parked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(3));
    let probe_parked = std::sync::Arc::clone(&parked);
    metrics.observe_state(move || {
        Some(StateGauges {
            parked_requests: vec![(
                "vm0".into(),
                probe_parked.load(std::sync::atomic::Ordering::Relaxed),
            )],
            cache_bytes: Some(1 << 20),
            cache_budget_bytes: 0,
        })
    });
    let parked_now = || sample(&metrics, "gantry_blk_parked_requests", &[("vm", "vm0")]);
    assert_eq!(parked_now(), Some(3.0));
    parked.store(0, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(parked_now(), Some(0.0), "read anew at each scrape");
    assert_eq!(
        sample(&metrics, "gantry_cache_bytes", &[]),
        Some(f64::from(1 << 20))
    );
    assert_eq!(
        sample(&metrics, "gantry_cache_budget_bytes", &[]),
        Some(0.0)
    );

    metrics.observe_state(|| None);
    assert_eq!(
        parked_now(),
        None,
        "a probe with nothing to say adds nothing"
    );
}

#[test]
fn handles_compare_by_the_series_they_count_into() {
    let metrics = Metrics::new();
    let blk = metrics.vm("vm0").blk;
    assert_eq!(blk, blk.clone());
    assert_ne!(blk, BlkMetrics::default());
}

#[test]
fn default_handles_count_without_a_registry() {
    // What the devices and the cache use in tests: counting works, nothing is exported.
    let blk = BlkMetrics::default();
    blk.completed(BlkOp::GetId, true, 0, Duration::ZERO);
    assert_eq!(blk.requests(BlkOp::GetId), 1);
    let vsock = VsockMetrics::default();
    vsock.guest_packet(true, 0);
    assert_eq!(vsock.connections(), 1);
    assert_eq!(
        sample(&Metrics::new(), "gantry_blk_requests_total", &[]),
        None
    );
}

#[test]
fn a_keepers_vsock_totals_are_absorbed_as_increases_and_a_new_keeper_counts_from_zero() {
    let metrics = Metrics::new();
    let vsock = metrics.vm("vm0").vsock;
    let vm = [("vm", "vm0")];
    let totals = |connections, from_guest, to_guest, credit_stalls| VsockTotals {
        connections,
        from_guest,
        to_guest,
        credit_stalls,
    };
    let first = totals(2, 100, 50, 1);
    vsock.absorb(&VsockTotals::default(), &first);
    let second = totals(3, 150, 80, 1);
    vsock.absorb(&first, &second);
    assert_eq!(
        sample(&metrics, "gantry_vsock_connections_total", &vm),
        Some(3.0)
    );
    assert_eq!(
        sample(&metrics, "gantry_vsock_credit_stalls_total", &vm),
        Some(1.0)
    );
    // The VM booted again: its new keeper's device counts from zero, all of it is new.
    vsock.absorb(&second, &totals(1, 10, 5, 0));
    assert_eq!(
        sample(&metrics, "gantry_vsock_connections_total", &vm),
        Some(4.0)
    );
    assert_eq!(vsock.totals().from_guest, 160);
    assert_eq!(vsock.totals().to_guest, 85);
}

#[test]
fn a_detached_vm_leaves_no_series_and_the_others_keep_theirs() {
    let metrics = Metrics::new();
    for name in ["gone", "stays"] {
        let vm = metrics.vm(name);
        vm.containers.counters.starts.inc();
        vm.blk.counters.read_bytes.inc_by(4096);
        vm.containers
            .counters
            .start_duration
            .observe(Duration::from_millis(5));
    }
    metrics.forget_vm("gone");
    let samples = scrape(&metrics).samples;
    assert!(
        samples.iter().all(|s| s.labels.get("vm") != Some("gone")),
        "a series of the detached VM is left"
    );
    assert!(
        samples.iter().any(|s| s.labels.get("vm") == Some("stays")),
        "the other VM's series went too"
    );
    // Attached again under the same name, it counts from zero.
    metrics.vm("gone").containers.counters.starts.inc();
    assert_eq!(
        sample(&metrics, "gantry_container_starts_total", &[("vm", "gone")]),
        Some(1.0)
    );
}
