from mnnn.ops.scan.naive import linear_scan_naive
from mnnn.ops.scan.parallel import linear_scan

__all__ = ["linear_scan", "linear_scan_naive"]
