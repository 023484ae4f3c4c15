# Sourced by the side-by-side benchmarks: the pinned scvi-tools venv (bench/requirements-scvi.txt;
# ~6 GB with torch) in target/scvi-venv, installed on first use; sets $venv.
venv=target/scvi-venv
if ! "$venv/bin/python" -c 'import scvi' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -r bench/requirements-scvi.txt
fi
