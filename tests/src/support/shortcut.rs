//! What the socket-shortcut tests (`reply_shortcut`, `request_shortcut`)
//! both look at: the bytes a pod's `lo` carried, the pod's kernel byte
//! counts, and an echo through the agent.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::{Pod, World, metric_value, python, testpeer};

/// Bytes the pod's loopback has received so far.
pub fn lo_rx_bytes(pod: &Pod) -> Result<u64> {
    lo_rx(pod, "bytes")
}

/// `field` (`bytes`, `packets`) of the pod's `lo` receive counters.
pub fn lo_rx(pod: &Pod, field: &str) -> Result<u64> {
    let out = pod.run_ok(Command::new("ip").args(["-s", "-j", "link", "show", "lo"]))?;
    let v: Value = serde_json::from_str(out.trim()).context("ip -j output")?;
    v[0]["stats64"]["rx"][field]
        .as_u64()
        .with_context(|| format!("no rx {field} in {out}"))
}

/// The client pod (0,0)'s kernel-counted bytes in `direction` (`in` or
/// `out`), and the part of them a sockmap moved.
pub fn pod_kernel_bytes(world: &World, direction: &str) -> Result<(f64, f64)> {
    let body = world.node(0).metrics()?;
    let labels = [("pod", world.pod(0, 0).name()), ("direction", direction)];
    let get = |name| metric_value(&body, name, &labels).unwrap_or(0.0);
    Ok((
        get("waymark_kernel_bytes_total"),
        get("waymark_kernel_sockmap_bytes_total"),
    ))
}

/// Runs a Python `script` in `pod` and parses the one JSON object it
/// prints, saying what the script said when it printed none.
pub fn run_json(pod: &Pod, script: &str, timeout: Duration) -> Result<Value> {
    let out = pod.run_timeout(python().args(["-c", script]), timeout)?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "client said {:?} {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Echoes `size` bytes through the agent from pod (0,0) to an echo server
/// in pod (1,0), sending while reading, and shutting down the client's
/// side only once every reply is back (a reply written after a half-close
/// takes TCP: the agent's socket has left ESTABLISHED). Checks they came
/// back byte-exact; returns how many bytes crossed the client pod's `lo`
/// meanwhile.
pub fn echo_through_agent(world: &World, size: u64) -> Result<u64> {
    let (cl, srv) = (world.pod(0, 0), world.pod(1, 0));
    let _echo = srv.serve(&mut testpeer(["echo", "--listen", "0.0.0.0:7000"]))?;
    let target = format!("{}:7000", srv.ip());
    let before = lo_rx_bytes(cl)?;
    let script = format!(
        r#"
import json, random, socket, threading
data = random.Random(7).randbytes({size})
host, port = "{target}".rsplit(":", 1)
s = socket.create_connection((host, int(port)), timeout=25)
sender = threading.Thread(target=s.sendall, args=(data,))
sender.start()
got = bytearray()
while len(got) < len(data):
    b = s.recv(1 << 20)
    if not b:
        break
    got += b
sender.join()
s.shutdown(socket.SHUT_WR)
print(json.dumps({{"identical": bytes(got) == data, "sent": len(data), "received": len(got)}}))
"#
    );
    let r = run_json(cl, &script, Duration::from_secs(60))?;
    ensure!(
        r["identical"] == true && r["sent"] == size && r["received"] == size,
        "{size} bytes through the echo server came back different: {r}"
    );
    Ok(lo_rx_bytes(cl)? - before)
}
