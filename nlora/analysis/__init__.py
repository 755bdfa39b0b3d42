"""Read-only consumers of a run directory (diagnostics, report, status, summary); they import no training code."""
