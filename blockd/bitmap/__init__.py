"""Dirty bitmaps: the bit array (:mod:`.hbitmap`) and the named, node-owned bitmap with its
successor protocol (:mod:`.dirty`)."""
