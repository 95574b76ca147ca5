//! Export work yields the CPU to pass-through traffic: the runtime threads that run export jobs run at
//! `server.background_nice`, the threads serving requests at the default priority. Read from the real
//! binary's threads in `/proc`, the kernel's own record.

mod common;

use std::collections::BTreeMap;

use common::*;

/// Each thread name of process `pid` with the nice values its threads of that name have.
fn nice_by_thread_name(pid: u32) -> BTreeMap<String, Vec<i64>> {
    let mut by_name: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap();
        let stat = std::fs::read_to_string(path.join("stat")).unwrap();
        // Fields after the parenthesised name, which may itself hold spaces: state is field 3, nice 19.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let nice: i64 = after_name.split(' ').nth(19 - 3).unwrap().parse().unwrap();
        by_name
            .entry(name.trim().to_owned())
            .or_default()
            .push(nice);
    }
    by_name
}

#[test]
fn export_threads_run_below_the_threads_serving_requests() {
    let upstream = upstream();
    for (server_toml, background) in [("", 10), ("background_nice = 0", 0)] {
        let proxy = Proxy::builder(&upstream).server_toml(server_toml).start();
        // The serving threads start just after the proxy says it listens.
        let mut threads = nice_by_thread_name(proxy.child_pid());
        for _ in 0..50 {
            if threads.keys().any(|name| name.starts_with("serve-")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            threads = nice_by_thread_name(proxy.child_pid());
        }
        let workers = threads
            .get("tokio-rt-worker")
            .unwrap_or_else(|| panic!("{threads:?}"));
        assert!(
            workers.iter().all(|&n| n == background),
            "with {server_toml:?}, the job runtime's threads: {threads:?}"
        );
        let serving: Vec<i64> = (threads.iter())
            .filter(|(name, _)| name.starts_with("serve-"))
            .flat_map(|(_, nice)| nice.clone())
            .collect();
        assert!(!serving.is_empty(), "no serving threads: {threads:?}");
        assert!(
            serving.iter().all(|&n| n == 0),
            "serving threads: {threads:?}"
        );
    }
}
