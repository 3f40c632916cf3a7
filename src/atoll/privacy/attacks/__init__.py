"""Attacks that measure the protections: poisoning (label flipping, backdoors, Byzantine updates),
free riding, membership inference and reconstruction of client text from updates."""
