roulette-intro = Крутіть колесо і вигравайте знижку! { $spins_left ->
    [0] У вас не залишилося спроб.
    [one] У вас { $spins_left } спроба.
    [few] У вас { $spins_left } спроби.
    [many] У вас { $spins_left } спроб.
   *[other] У вас { $spins_left } спроби.
}
roulette-btn-spin = Крутити!
roulette-btn-again = Ще раз
roulette-btn-claim = Отримати код
roulette-prize-10 = знижку 10%
roulette-prize-25 = знижку 25%
roulette-prize-shipping = безкоштовну доставку
roulette-prize-nothing = цього разу нічого
roulette-won = Ви виграли { $prize_label }! Натисніть кнопку, щоб отримати код.
roulette-code = Ваш код: { $prize_code }. Використайте його під час оформлення.
roulette-already-won = Ви вже виграли { $prize_label }. Ваш код: { $prize_code }. Один приз на покупця — дякуємо за гру!
roulette-lost = Цього разу не пощастило. Спробуйте ще!
roulette-no-spins = Ви використали всі спроби. Запросіть друга й отримайте ще одну: https://t.me/ExampleShopBot?start={ $referral_ref }
roulette-out = На жаль, призи закінчилися. Дякуємо за гру!
