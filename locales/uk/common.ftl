default-name = друже
common-fallback = Вибачте, я не зрозумів. Надішліть /start, щоб знову побачити меню.
