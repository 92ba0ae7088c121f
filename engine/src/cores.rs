//! Which CPUs run executors, and which lanes each executor serves.

use caduceus_policy::Lane;
use caduceus_policy::config::Config;

/// One executor: the CPU it is pinned to and the lanes whose sockets it
/// serves and whose mail it owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecutorSpec {
    /// Position in the executor list; also the spool shard number it writes.
    pub index: u16,
    pub cpu: usize,
    pub lanes: Vec<Lane>,
}

/// The CPUs this process may run on, from its affinity mask.
pub fn available_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count())
            .filter(|cpu| set.is_set(*cpu).unwrap_or(false))
            .collect(),
        Err(_) => (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect(),
    }
}

/// Describes the machine's CPUs: SMT siblings and NUMA node of each, read
/// from /sys/devices/system/cpu.
pub fn topology_report(cpus: &[usize]) -> String {
    let mut report = format!("{} CPUs available to this process\n", cpus.len());
    report.push_str(&format!(
        "{:>5} {:>14} {:>6}\n",
        "CPU", "SMT SIBLINGS", "NODE"
    ));
    for cpu in cpus {
        let base = format!("/sys/devices/system/cpu/cpu{cpu}");
        let siblings = std::fs::read_to_string(format!("{base}/topology/thread_siblings_list"))
            .map(|text| text.trim().to_string())
            .unwrap_or_else(|_| "?".into());
        let node = std::fs::read_dir(&base)
            .ok()
            .and_then(|entries| {
                entries.flatten().find_map(|entry| {
                    let name = entry.file_name().to_string_lossy().to_string();
                    name.strip_prefix("node").map(str::to_string)
                })
            })
            .unwrap_or_else(|| "0".into());
        report.push_str(&format!("{cpu:>5} {siblings:>14} {node:>6}\n"));
    }
    report
}

/// Computes the executor allocation from the config.
///
/// Lanes with explicit `cores` get exactly those. Otherwise, on one CPU a
/// single executor serves both lanes; on two or more, the first quarter of
/// the CPUs (at least one) serves transactional mail and the rest serve
/// bulk mail. Transactional mail is a small share of messages but needs
/// idle capacity for its latency, so a quarter is reserved rather than a
/// share proportional to volume.
pub fn allocate(config: &Config, cpus: &[usize]) -> Result<Vec<ExecutorSpec>, String> {
    if cpus.is_empty() {
        return Err(
            "no CPU is available to this process (check its affinity mask with `taskset -p $$`)"
                .into(),
        );
    }
    let transactional = &config.lanes.transactional.cores;
    let bulk = &config.lanes.bulk.cores;
    let (transactional, bulk) = match (transactional.is_empty(), bulk.is_empty()) {
        (false, false) => (transactional.clone(), bulk.clone()),
        (true, true) if cpus.len() == 1 => {
            return Ok(vec![ExecutorSpec {
                index: 0,
                cpu: cpus[0],
                lanes: vec![Lane::Transactional, Lane::Bulk],
            }]);
        }
        (true, true) => {
            let reserved = (cpus.len() / 4).max(1);
            (cpus[..reserved].to_vec(), cpus[reserved..].to_vec())
        }
        (false, true) => {
            let rest: Vec<usize> = cpus
                .iter()
                .copied()
                .filter(|cpu| !transactional.contains(cpu))
                .collect();
            if rest.is_empty() {
                return Err("lanes.bulk.cores is empty and lanes.transactional.cores takes every CPU; list the bulk lane's CPUs in lanes.bulk.cores".into());
            }
            (transactional.clone(), rest)
        }
        (true, false) => {
            let rest: Vec<usize> = cpus
                .iter()
                .copied()
                .filter(|cpu| !bulk.contains(cpu))
                .collect();
            if rest.is_empty() {
                return Err("lanes.transactional.cores is empty and lanes.bulk.cores takes every CPU; list the transactional lane's CPUs in lanes.transactional.cores".into());
            }
            (vec![rest[0]], bulk.clone())
        }
    };
    for cpu in transactional.iter().chain(bulk.iter()) {
        if !cpus.contains(cpu) {
            return Err(format!(
                "CPU {cpu} in lanes.*.cores is not available to this process (available: {cpus:?}); run `caduceus cores` to see the machine's CPUs"
            ));
        }
    }
    if let Some(cpu) = transactional.iter().find(|cpu| bulk.contains(cpu))
        && !config.lanes.allow_shared_cpus
    {
        return Err(format!(
            "CPU {cpu} is in both lanes.transactional.cores and lanes.bulk.cores; each CPU serves one lane so that bulk mail never delays transactional mail"
        ));
    }
    if let Some(cpu) = transactional.iter().find(|cpu| bulk.contains(cpu)) {
        tracing::warn!(
            cpu,
            "engine: lanes.allow_shared_cpus lets CPU {cpu} serve both lanes; transactional mail is not isolated from bulk mail"
        );
    }
    let mut specs = Vec::new();
    for (lane, lane_cpus) in [(Lane::Transactional, &transactional), (Lane::Bulk, &bulk)] {
        let mut seen = Vec::new();
        for cpu in lane_cpus.iter() {
            if seen.contains(cpu) {
                return Err(format!(
                    "CPU {cpu} is listed twice in lanes.{}.cores",
                    lane.as_str()
                ));
            }
            seen.push(*cpu);
            specs.push(ExecutorSpec {
                index: specs.len() as u16,
                cpu: *cpu,
                lanes: vec![lane],
            });
        }
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_two_cpus_one_per_lane() {
        let specs = allocate(&Config::default(), &[0, 1]).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].cpu, 0);
        assert_eq!(specs[0].lanes, vec![Lane::Transactional]);
        assert_eq!(specs[1].cpu, 1);
        assert_eq!(specs[1].lanes, vec![Lane::Bulk]);
    }

    #[test]
    fn allocate_one_cpu_shares_it() {
        let specs = allocate(&Config::default(), &[3]).unwrap();
        assert_eq!(specs.len(), 1);
        assert_eq!(specs[0].lanes, vec![Lane::Transactional, Lane::Bulk]);
    }

    #[test]
    fn allocate_eight_cpus_reserves_a_quarter() {
        let cpus: Vec<usize> = (0..8).collect();
        let specs = allocate(&Config::default(), &cpus).unwrap();
        let transactional = specs
            .iter()
            .filter(|spec| spec.lanes == vec![Lane::Transactional])
            .count();
        assert_eq!(transactional, 2);
        assert_eq!(specs.len(), 8);
    }

    #[test]
    fn allocate_rejects_overlap() {
        let mut config = Config::default();
        config.lanes.transactional.cores = vec![0];
        config.lanes.bulk.cores = vec![0, 1];
        let error = allocate(&config, &[0, 1]).unwrap_err();
        assert!(error.contains("CPU 0 is in both"), "{error}");
    }

    #[test]
    fn allocate_shares_cpus_when_allowed() {
        let mut config = Config::default();
        config.lanes.transactional.cores = vec![0];
        config.lanes.bulk.cores = vec![0, 1];
        config.lanes.allow_shared_cpus = true;
        let specs = allocate(&config, &[0, 1]).unwrap();
        let cpus: Vec<(usize, Vec<Lane>)> = specs
            .iter()
            .map(|spec| (spec.cpu, spec.lanes.clone()))
            .collect();
        assert_eq!(
            cpus,
            vec![
                (0, vec![Lane::Transactional]),
                (0, vec![Lane::Bulk]),
                (1, vec![Lane::Bulk]),
            ]
        );
    }

    #[test]
    fn allocate_rejects_missing_cpu() {
        let mut config = Config::default();
        config.lanes.transactional.cores = vec![7];
        let error = allocate(&config, &[0, 1]).unwrap_err();
        assert!(error.contains("CPU 7"), "{error}");
    }
}
