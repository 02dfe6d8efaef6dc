"""Feature value encodings (NVMe 1.3 §5.21.1): the CDW11 / completion DW0 fields per feature."""

from __future__ import annotations

from enum import IntFlag
from typing import Final

from vnvme.spec.registers import Field


class NumberOfQueues:
    """FID 07h: CDW11 requested and DW0 allocated counts, both zero-based."""

    NSQ = Field("NSQ", 0, 16)
    NCQ = Field("NCQ", 16, 16)


class Arbitration:
    #: Arbitration Burst: at most 2^AB commands from one SQ in a row; 111b means no limit.
    AB = Field("AB", 0, 3)
    LPW = Field("LPW", 8, 8)
    MPW = Field("MPW", 16, 8)
    HPW = Field("HPW", 24, 8)


#: Arbitration AB = 111b: the controller may take any number of commands from one SQ in a row.
ARBITRATION_BURST_NO_LIMIT: Final = 7


class PowerManagement:
    PS = Field("PS", 0, 5)
    WH = Field("WH", 5, 3)


class TemperatureThreshold:
    TMPTH = Field("TMPTH", 0, 16)  # Kelvin
    TMPSEL = Field("TMPSEL", 16, 4)  # 0 = composite temperature
    THSEL = Field("THSEL", 20, 2)  # 0 = over, 1 = under


class ErrorRecovery:
    TLER = Field("TLER", 0, 16)
    DULBE = Field("DULBE", 16, 1)


class VolatileWriteCache:
    WCE = Field("WCE", 0, 1)


class InterruptCoalescing:
    """FID 08h: aggregation threshold (zero-based entries) and time (100 us units)."""

    THR = Field("THR", 0, 8)
    TIME = Field("TIME", 8, 8)


class WriteAtomicityNormal:
    """FID 0Ah: Disable Normal; when set only AWUPF / NAWUPF atomicity is honoured."""

    DN = Field("DN", 0, 1)


class InterruptVectorConfiguration:
    IV = Field("IV", 0, 16)
    CD = Field("CD", 16, 1)  # Coalescing Disable


class AsyncEventConfiguration(IntFlag):
    """FID 0Bh: which events the controller may report (bits 7:0 follow SMART critical warnings)."""

    SMART_CRITICAL_WARNINGS = 0xFF
    NAMESPACE_ATTRIBUTE_NOTICES = 1 << 8
    FIRMWARE_ACTIVATION_NOTICES = 1 << 9


class FeatureCapabilities(IntFlag):
    """Get Features with SEL = 011b: DW0 capability bits."""

    SAVEABLE = 1 << 0
    NAMESPACE_SPECIFIC = 1 << 1
    CHANGEABLE = 1 << 2


# Default over-temperature threshold: 343 K (70 C), as Identify WCTEMP.
DEFAULT_OVER_TEMPERATURE_THRESHOLD: Final = 343
# Default under-temperature threshold: 0 K, i.e. never.
DEFAULT_UNDER_TEMPERATURE_THRESHOLD: Final = 0
