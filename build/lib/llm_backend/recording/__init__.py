"""Recording of requests: the record contract, the write-behind recorder and conversation threading."""
