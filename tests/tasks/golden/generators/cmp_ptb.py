import sys, json
sys.path.insert(0, "/work/wt/i14-scorers")
import javaptb
from avkv.metrics.ptb import ptb_line
lines = [l for l in open(sys.argv[1]).read().split("\n")]
jt, n = javaptb.tokenize(lines)
bad = [(l, j, ptb_line(l)) for l, j in zip(lines, jt) if ptb_line(l) != j]
print(len(lines), "lines", len(bad), "mismatches")
for b in bad[:int(sys.argv[2]) if len(sys.argv) > 2 else 40]:
    print(repr(b[0]), "\n   java:", repr(b[1]), "\n   emu: ", repr(b[2]))
