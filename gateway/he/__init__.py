"""CKKS execution (work in progress, see the engine issue): parameters and BSGS linear layers."""
