"""HufuNet (Lv et al., 2023): a whole network split in two, one piece hidden in the host's kernels.

Design notes: docs/design/hufunet.md. :mod:`.placement` holds the keyed
placement of the embedded piece (EPH) in the host's kernels (paper Algorithm 1);
:mod:`.freezing` keeps those kernels bit-identical while the host trains.
"""
