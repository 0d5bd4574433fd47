"""Running a sweep: the spec, the search space, the trial loop (one process or data-parallel), the
driver and what it prints."""
