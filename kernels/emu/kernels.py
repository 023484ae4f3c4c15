"""Lists the kernels of a .cu source for registry.h: `EMU_KERNEL(name, waits)` per
`extern "C" __global__` function, `waits` 1 when its body, or a function it calls in the same
file, has a barrier (`__syncthreads`, a warp shuffle), so only those run their threads as
fibers; the rest run each thread as a plain call."""

import re
import sys

# Comments out first: their parentheses would read as calls.
source = re.sub(r"//[^\n]*|/\*.*?\*/", "", open(sys.argv[1]).read(), flags=re.S)
# Every function definition: its name and body, by brace matching.
bodies = {}
for m in re.finditer(r"\b([A-Za-z_][A-Za-z_0-9]*)\s*\([^;{)]*(?:\)[^;{]*)?\{", source):
    depth, i = 1, m.end()
    while depth and i < len(source):
        depth += {"{": 1, "}": -1}.get(source[i], 0)
        i += 1
    bodies.setdefault(m.group(1), source[m.end() : i])
waits = {name for name, body in bodies.items() if re.search(r"__syncthreads|__shfl_", body)}
changed = True
while changed:
    changed = False
    for name, body in bodies.items():
        if name not in waits and any(re.search(rf"\b{w}\s*\(", body) for w in waits):
            waits.add(name)
            changed = True
for name in re.findall(r'extern "C" __global__ void ([A-Za-z_0-9]+)', source):
    print(f"EMU_KERNEL({name}, {int(name in waits)})")
