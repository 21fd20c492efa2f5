"""The runtime: the decode loop's host side (`loop`, `sampler`), `generate` over the static cache and the
continuous-batching `Engine` (`serve`) over the paged cache."""
