# One copy only: imported under its bare name as well, every module here would load
# twice (two of each class, of each module-level table), so a straggler's "import common" fails.
if __name__ != "tron.common":
    raise ImportError(f"import tron.common, not {__name__}: Tron's packages live under the tron namespace")
