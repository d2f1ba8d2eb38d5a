"""The DICOM node that serve.py runs, one concern per module. Imports run one way, from the
top of this list down (none imports a script: serve.py, main.py, infer.py, report.py):

    core.py          the Node: the state its paths share, which lock guards what, /health
    receiver.py      the receive path (C-STORE in, to the inbox)
    processor.py     the process path (inbox -> decoded, inferred, results -> outbox, done/)
    sender.py        the send path (outbox -> the destination by C-STORE, or STOW-RS)
    stow.py          DICOMweb out: STOW-RS requests and what their answers mean
    http.py          POST /predict, GET /health
    network.py       pynetdicom's Storage SCP and the Doorman
    pynetdicom_internals.py   everything that reaches into pynetdicom's internals, and the
                     check of its version
    retrieve.py      retrieve.py's query/retrieve in (C-FIND, C-MOVE to the node, the journal);
                     imported by retrieve.py only, never by the node's own modules
    tls.py           SSL contexts, listening and to the destination (DICOM TLS, HTTPS)
    workers.py       the worker processes and the tasks they run
    pipeline.py      the OpenVINO model, its operating points, the inference thread
    results.py       the Structured Report and the heatmaps
    checks.py        a received object checked before decoding
    spool.py         the spool, durable writes
    settings.py      NodeSettings, what serve.py's flags say, as values
    dicom.py, logs.py   constants, exceptions, the log
"""
