"""The two store implementations (a local directory, an object-store bucket) and the safe
filesystem primitives the local one rests on."""
