"""What losing a worker costs a distributed job: wall time of `tessera train --workers 3`
uninterrupted, with one worker SIGKILLed, and with one SIGTERMed (it checkpoints the step and
leaves) once epoch 2 of 5 is reported.

    cargo build --release -p tessera-cli && python3 bench/recovery.py [--cells 30000] [--genes 1000]
"""
import argparse, os, re, signal, subprocess, tempfile, time

parser = argparse.ArgumentParser()
parser.add_argument("--tessera", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "tessera"))
parser.add_argument("--cells", default="30000")
parser.add_argument("--genes", default="1000")
args = parser.parse_args()
env = dict(os.environ, TESSERA_LOG="error")
with tempfile.TemporaryDirectory() as root:
    config = os.path.join(root, "c.toml")
    with open(config, "w") as f:
        f.write("[model]\nn_hidden = 128\n[train]\nmax_epochs = 5\nparts = 3\n")
    for case in ["none", "KILL", "TERM"]:
        # A store per run: training writes its embedding into it.
        store = os.path.join(root, f"{case}.zarr")
        subprocess.run([args.tessera, "simulate", store, "--cells", args.cells, "--genes", args.genes], check=True, env=env, capture_output=True)
        started = time.time()
        run = subprocess.Popen([args.tessera, "train", "--data", store, "--config", config, "--out", os.path.join(root, f"out-{case}"), "--workers", "3"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        pids, recovering, signalled = [], set(), None
        for line in run.stdout:
            if m := re.search(r": pid (\d+)", line):
                pids.append(int(m.group(1)))
            if "RECOVERING (" in line:
                recovering.add(line.split("(", 1)[1].split(")")[0])
            if line.startswith("epoch 2/5") and case != "none" and signalled is None:
                os.kill(pids[1], getattr(signal, "SIG" + case))
                signalled = time.time() - started
        run.wait()
        at = "" if signalled is None else f", SIG{case} at {signalled:.1f} s"
        print(f"{case:>4}: exit {run.returncode}, {time.time() - started:.1f} s{at} {sorted(recovering)}")
