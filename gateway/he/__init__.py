"""CKKS execution of int8 models.

``graph`` lowers the ONNX model to affine maps and squares, ``packing`` says where values sit in
the slots (shared by client and server), ``linear`` evaluates an affine map as baby-step /
giant-step diagonal products, ``params`` chooses secure CKKS parameters, ``plan`` holds the public
:class:`~gateway.he.plan.EncryptionSpec` and the server's encoded model, ``client`` makes keys
and encrypts, ``wire`` turns SEAL objects into checked bytes, ``flooding`` makes a
``circuit_private`` result tell its client nothing about the model beyond the logits.
"""
