"""`openkms xks-proxy`: an external key store proxy (AWS's XKS proxy API, spec v1.0.3) in front of
a PKCS#11 token, so that AWS KMS, or openkms, can use keys that never leave the customer's HSM.

- config.py: the TOML file, checked whole at load (and again on SIGHUP);
- errors.py: the spec's error names with their HTTP statuses;
- keys.py: the token's AES-256 keys (lookup by CKA_LABEL, usage, GCM in the token, the health test
  key), run on one worker thread (worker.py) because every PKCS#11 call is serialised anyway;
- app.py: the four APIs and /ping, with the checks in the order AWS's test client expects;
- server.py: HTTP/1.1 (httptools) over asyncio, TLS 1.2+ with optional mTLS, signals;
- cli.py: the `openkms xks-proxy` commands.

Nothing here imports the rest of the server (storage, service, API): the proxy runs on its own,
usually on another machine, next to the HSM.
"""
