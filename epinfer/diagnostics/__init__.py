"""Diagnostics: the collective ledger, dumps, the watchdog, fault injection, numeric checks and
`epinfer doctor`."""
