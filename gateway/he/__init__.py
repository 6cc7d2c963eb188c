"""CKKS execution of int8 models (in progress with the engine issue).

``graph`` lowers the ONNX model to affine maps and squares, ``linear`` evaluates an affine map as
baby-step / giant-step diagonal products, ``params`` chooses secure CKKS parameters, ``plan``
holds the public :class:`~gateway.he.plan.EncryptionSpec` and the server's encoded model,
``client`` makes keys and encrypts, ``wire`` turns SEAL objects into checked bytes.
"""
