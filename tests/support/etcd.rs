//! A real etcd cluster on loopback (the `etcd` of Debian's `etcd-server`, 3.4): N members
//! on free ports (etcd needs explicit ports: each is bound on port 0 and closed first),
//! data directories in a temporary directory, every member killed by its pid on drop.
//! Members can be killed and started again on their data (the cluster keeps its state).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flowgate::control::etcd::EtcdClient;

/// Runs `f` on a runtime of its own in a thread of its own (callable from async tests).
pub fn block<F: std::future::Future + Send>(f: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(f)
        })
        .join()
        .expect("etcd helper thread")
    })
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    l.local_addr().expect("local addr").port()
}

/// One member: its name, ports and process (when running).
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub child: Option<Child>,
}

pub struct Cluster {
    pub dir: PathBuf,
    pub members: Vec<Member>,
    initial_cluster: String,
}

impl Cluster {
    /// Starts `n` members and waits until the cluster takes writes.
    pub fn start(dir: &Path, n: usize) -> Cluster {
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster { dir: dir.to_owned(), members, initial_cluster };
        for i in 0..n {
            c.start_member(i);
        }
        c.wait_writable();
        c
    }

    /// The client URLs, comma-separated.
    pub fn endpoints(&self) -> String {
        self.urls().join(",")
    }

    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("http://127.0.0.1:{}", m.client_port)).collect()
    }

    pub fn client(&self) -> EtcdClient {
        EtcdClient::new(&self.urls(), Duration::from_secs(2), None).expect("endpoints")
    }

    /// Starts member `i` (again, on its data directory when it ran before).
    pub fn start_member(&mut self, i: usize) {
        let m = &self.members[i];
        let log = std::fs::File::create(self.dir.join(format!("{}.log", m.name))).expect("log");
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.dir.join(&m.name))
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{}", m.client_port))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{}", m.client_port))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer_port))
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-token")
            .arg("flowgate-test")
            .arg("--max-txn-ops")
            .arg("50000")
            .arg("--max-request-bytes")
            .arg("67108864")
            // Fast elections on loopback: a killed leader is replaced in well under a second.
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.members[i].child = Some(child);
    }

    /// Kills member `i` (SIGKILL) and reaps it.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The index of the current leader, as the members report it.
    pub fn leader(&self) -> Option<usize> {
        let client = self.client();
        let status = block(client.status());
        let leader = status.first()?.leader;
        let ep = status.iter().find(|s| s.member == leader)?.endpoint.clone();
        self.members.iter().position(|m| ep.ends_with(&format!(":{}", m.client_port)))
    }

    /// Waits (bounded) until a write succeeds.
    pub fn wait_writable(&self) {
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if block(client.put("/probe", b"1", 0)).is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "etcd cluster not writable; logs in {:?}", self.dir);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }
}
