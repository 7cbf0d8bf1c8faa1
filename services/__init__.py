# One copy only: imported under its bare name as well, every module here would load
# twice (two of each class, of each module-level table), so a straggler's "import services" fails.
if __name__ != "tron.services":
    raise ImportError(f"import tron.services, not {__name__}: Tron's packages live under the tron namespace")
