//! Finding and killing every process one attempt of the command backend started, including
//! descendants that left its process group (`setsid`, `setpgid`) or were orphaned.
//!
//! On Linux the process becomes a child subreaper (once, when the first command backend is
//! built), so orphaned descendants are reparented to us instead of init and we can reap them.
//! Every attempt's program gets [`MARK_ENV`] set to a value unique to the attempt, which its
//! descendants inherit. Killing a tree repeats rounds until no live process of it is left: scan
//! `/proc` once, take the root, its process group, every process whose environment carries the
//! mark and every process seen in an earlier round, plus all their descendants; SIGKILL them and
//! reap the ones that became our zombie children. Only pids found this way are waited for, by
//! pid: a `waitpid(-1)` would steal exit statuses from tokio and from anything else in the
//! process that spawns children.
//!
//! Orphans that died before any round found them are zombie children of ours with no mark left
//! to read. Each round also reaps every zombie child of ours outside our own process group that
//! is not a program we spawned and have yet to wait for (`ROOTS`). This relies on one invariant:
//! nothing else in this process spawns children outside its process group (the server and the
//! worker spawn only model programs; the test harness spawns into its own group).
//!
//! A live descendant that scrubbed its environment and was orphaned before the attempt ended
//! cannot be told apart from other processes and is missed. Elsewhere than Linux only the
//! process group is killed.
//!
//! Concurrency model: everything here is blocking (`/proc` reads, signals, `waitpid`); callers
//! run it on a blocking thread. Trees are independent; concurrent kills of different trees only
//! share the zombie reaping, where a pid reaped by one is simply gone for the other.

use std::time::Duration;

/// The environment variable that marks every process of one attempt.
pub const MARK_ENV: &str = "TASKGATE_ATTEMPT_MARK";

/// How long a tree may take to die before we give up and log it.
pub const KILL_BOUND: Duration = Duration::from_secs(5);

/// Processes of the tree that were still alive when the bound ran out.
#[derive(Debug, thiserror::Error)]
#[error("{} process(es) of the attempt still alive after {after:?}: {pids:?}", pids.len())]
pub struct Survivors {
    pub pids: Vec<i32>,
    pub after: Duration,
}

/// Makes this process a child subreaper, once; orphaned descendants of our children are then
/// reparented to us, where the tree kill can find and reap them.
pub fn become_subreaper() {
    #[cfg(target_os = "linux")]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
                tracing::warn!(error = %e, "cannot become a child subreaper; orphaned model processes will be missed");
            }
        });
    }
}

/// Spawns `cmd` as the root of a process tree marked with `mark`. `cmd` must put the program in
/// a process group of its own (`process_group(0)`): the tree kill takes that group.
pub fn spawn(
    cmd: &mut tokio::process::Command,
    mark: String,
) -> std::io::Result<(tokio::process::Child, Option<ProcessTree>)> {
    cmd.env(MARK_ENV, &mark);
    #[cfg(target_os = "linux")]
    {
        // Held across the spawn so that no round can take the new program, should it exit at
        // once, for an orphan and reap it before tokio does.
        let mut roots = linux::roots();
        let child = cmd.spawn()?;
        let tree = child.id().and_then(|id| i32::try_from(id).ok()).map(|pid| {
            roots.insert(pid);
            ProcessTree::new(pid, mark)
        });
        Ok((child, tree))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let child = cmd.spawn()?;
        let tree = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(|pid| ProcessTree::new(pid, mark));
        Ok((child, tree))
    }
}

/// A fresh mark for one attempt: 128 random bits, so no other process carries it by chance.
pub fn new_mark() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// One attempt's processes: the program we spawned (the root, leader of its own process group)
/// and everything carrying the attempt's mark.
#[derive(Debug)]
pub struct ProcessTree {
    root: i32,
    mark: String,
    #[cfg(target_os = "linux")]
    linux: linux::State,
}

impl ProcessTree {
    /// Called right after spawning `root`, before it can be reaped: its start time tells it
    /// apart from a later process that reuses the pid.
    fn new(root: i32, mark: String) -> Self {
        ProcessTree {
            root,
            #[cfg(target_os = "linux")]
            linux: linux::State::new(root),
            mark,
        }
    }

    /// Signals the root's process group: one syscall, cheap enough for any thread. The rounds
    /// of [`ProcessTree::kill`] find the rest.
    pub fn kill_group(&self) {
        use nix::sys::signal::{killpg, Signal};
        // ESRCH (the group is gone) is the common case.
        let _ = killpg(nix::unistd::Pid::from_raw(self.root), Signal::SIGKILL);
    }

    /// One round: signals every live process of the tree and reaps its zombies; returns the
    /// pids that were alive (so signalled) this round.
    pub fn kill_round(&mut self) -> Vec<i32> {
        #[cfg(target_os = "linux")]
        {
            self.linux.round(self.root, &self.mark)
        }
        #[cfg(not(target_os = "linux"))]
        {
            use nix::sys::signal::{killpg, Signal};
            let _ = killpg(nix::unistd::Pid::from_raw(self.root), Signal::SIGKILL);
            let _ = &self.mark;
            Vec::new()
        }
    }

    /// Kills rounds until no live process of the tree is left or `bound` has passed.
    pub fn kill(mut self, bound: Duration) -> Result<(), Survivors> {
        let start = std::time::Instant::now();
        loop {
            let live = self.kill_round();
            if live.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= bound {
                return Err(Survivors {
                    pids: live,
                    after: bound,
                });
            }
            // SIGKILL is delivered at once but the process dies when next scheduled.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::collections::{HashMap, HashSet, VecDeque};
    use std::sync::{Mutex, MutexGuard, PoisonError};

    use nix::sys::signal::{kill, killpg, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag};
    use nix::unistd::{getpgrp, getpid, Pid};

    /// Programs spawned by [`super::spawn`] that tokio has not waited for yet: in a process
    /// group of their own, they look like escaped orphans to the zombie sweep.
    static ROOTS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

    pub(super) struct Roots(MutexGuard<'static, Vec<i32>>);

    impl Roots {
        pub(super) fn insert(&mut self, pid: i32) {
            self.0.push(pid);
        }
    }

    pub(super) fn roots() -> Roots {
        // The list stays consistent whatever panicked while holding it.
        Roots(ROOTS.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// What one `/proc/PID/stat` says about a process.
    #[derive(Debug, Clone, Copy)]
    struct Proc {
        ppid: i32,
        pgrp: i32,
        /// In clock ticks since boot; with the pid, it names one process for good.
        start: u64,
        zombie: bool,
    }

    #[derive(Debug)]
    pub(super) struct State {
        /// The root's start time, when it could be read.
        root_start: Option<u64>,
        /// Whether the root is still in `ROOTS`.
        registered: bool,
        /// Every process of the tree found so far (pid → start time), so one that left every
        /// other link to the tree is still killed and reaped in later rounds.
        seen: HashMap<i32, u64>,
    }

    impl State {
        pub(super) fn new(root: i32) -> Self {
            State {
                root_start: read_stat(root).map(|p| p.start),
                registered: true,
                seen: HashMap::new(),
            }
        }

        pub(super) fn round(&mut self, root: i32, mark: &str) -> Vec<i32> {
            if std::mem::take(&mut self.registered) {
                // The first round comes after tokio reaped the root or, when the attempt is
                // dropped, as tokio is about to kill it: the root's exit status is no longer
                // awaited, and a sweep that reaps it first costs tokio's orphan queue nothing.
                roots().0.retain(|&pid| pid != root);
            }
            let me = getpid().as_raw();
            let my_group = getpgrp().as_raw();
            let procs = scan();
            let needle = format!("{}={mark}", super::MARK_ENV);
            // No process of the tree is older than its root.
            let born_after = self.root_start.unwrap_or(0);

            let mut seeds: Vec<i32> = Vec::new();
            let mut group_exists = false;
            for (&pid, p) in &procs {
                let is_root = pid == root && Some(p.start) == self.root_start;
                // A pid in use as a process group id is never handed to a new process, so the
                // group's members need no start-time check.
                let in_group = p.pgrp == root;
                group_exists |= in_group;
                let seen_before = self.seen.get(&pid) == Some(&p.start);
                let marked = !p.zombie && p.start >= born_after && has_env(pid, &needle);
                if is_root || in_group || seen_before || marked {
                    seeds.push(pid);
                }
            }
            let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
            for (&pid, p) in &procs {
                children.entry(p.ppid).or_default().push(pid);
            }
            let mut members: HashSet<i32> = HashSet::new();
            let mut queue: VecDeque<i32> = seeds.into();
            while let Some(pid) = queue.pop_front() {
                let Some(p) = procs.get(&pid) else { continue };
                if !members.insert(pid) {
                    continue;
                }
                self.seen.insert(pid, p.start);
                if let Some(kids) = children.get(&pid) {
                    queue.extend(kids.iter().copied());
                }
            }

            if group_exists {
                // Atomic against forks inside the group, unlike the per-pid kills below.
                let _ = killpg(Pid::from_raw(root), Signal::SIGKILL);
            }
            let mut live = Vec::new();
            for &pid in &members {
                let p = procs[&pid];
                if p.zombie {
                    // The root is tokio's to reap; reaping it here would take its exit status.
                    if p.ppid == me && pid != root {
                        reap(pid);
                    }
                } else {
                    // ESRCH: it died since the scan, which is what we want.
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    live.push(pid);
                }
            }
            // Zombie children outside our process group that we did not spawn: orphans that left
            // their group (of this attempt or another one) and died before a round could read
            // their mark. Nobody else will reap them. The lock keeps a program being spawned
            // from being taken for one of them.
            let roots = roots();
            for (&pid, p) in &procs {
                if p.zombie && p.ppid == me && p.pgrp != my_group && !roots.0.contains(&pid) {
                    reap(pid);
                }
            }
            live
        }
    }

    fn reap(pid: i32) {
        // ECHILD: someone reaped it first (another tree's round); either way it is gone.
        let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
    }

    fn scan() -> HashMap<i32, Proc> {
        let mut out = HashMap::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return out;
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            // A process that exits between the listing and the read is simply not there.
            if let Some(p) = read_stat(pid) {
                out.insert(pid, p);
            }
        }
        out
    }

    fn read_stat(pid: i32) -> Option<Proc> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        parse_stat(&stat)
    }

    /// Fields after the command name, which is parenthesised and may itself contain spaces
    /// and parentheses (see proc(5)): state, ppid, pgrp, … starttime (the 20th).
    fn parse_stat(stat: &str) -> Option<Proc> {
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some(Proc {
            zombie: *fields.first()? == "Z",
            ppid: fields.get(1)?.parse().ok()?,
            pgrp: fields.get(2)?.parse().ok()?,
            start: fields.get(19)?.parse().ok()?,
        })
    }

    fn has_env(pid: i32, needle: &str) -> bool {
        // Unreadable (another user's process, or gone): not ours to kill.
        std::fs::read(format!("/proc/{pid}/environ"))
            .map(|env| env.split(|&b| b == 0).any(|var| var == needle.as_bytes()))
            .unwrap_or(false)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn stat_fields_are_read_after_a_command_name_with_spaces_and_parentheses() {
            let stat = "4242 (a (weird) name) Z 7 4242 4242 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 987654 0 0";
            let p = parse_stat(stat).expect("parses");
            assert!(p.zombie);
            assert_eq!((p.ppid, p.pgrp, p.start), (7, 4242, 987654));
        }
    }
}
