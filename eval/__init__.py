"""Realism evaluation: FID/KID/PRDC, diversity, memorisation, reader studies, downstream utility."""
