"""The leaf of the package: configuration records, errors, sampling parameters, the forward metadata
that layers read, typed environment switches, and safe reads of untrusted files. Imports nothing
else of epinfer."""
